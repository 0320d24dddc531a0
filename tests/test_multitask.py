"""Several task adapters on one backbone: shared storage, isolation, files and errors.

(Every method's isolation and equivalence as a task is checked in the shared matrix.)
"""

from __future__ import annotations

import pytest
import torch

import vpeft
from vpeft import MultiTaskModel

from conftest import NUM_CLASSES, TINY_DIMS, tiny_model


def images(n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, TINY_DIMS["img_size"], TINY_DIMS["img_size"], generator=g)


def randomize(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)


def two_tasks() -> MultiTaskModel:
    tasks = MultiTaskModel(tiny_model().eval())
    randomize(tasks.add("digits", "lora", rank=2, num_classes=10))
    randomize(tasks.add("pets", "bitfit", num_classes=37))
    return tasks.eval()


def test_tasks_share_the_backbone_storage_and_count_only_their_own_tensors():
    tasks = two_tasks()
    qkv = tasks.backbone.blocks[0].attn.qkv.weight
    assert tasks["digits"].blocks[0].attn.qkv.base.weight is qkv
    assert tasks["pets"].blocks[0].attn.qkv.weight is qkv
    # BitFit trains biases in place: the task has its own copies, the backbone keeps its own
    assert tasks["pets"].blocks[0].attn.qkv.bias is not tasks.backbone.blocks[0].attn.qkv.bias
    counts = tasks.parameter_counts()
    assert counts["backbone"] == sum(p.numel() for p in tasks.backbone.parameters())
    for name in ("digits", "pets"):
        assert counts[name] == vpeft.summary(tasks[name]).trainable
    unique = {id(p): p.numel() for p in tasks.parameters()}
    assert sum(unique.values()) == sum(counts.values())
    assert tasks["digits"](images()).shape == (3, 10) and tasks(images(), "pets").shape == (3, 37)


def test_dtype_and_device_moves_keep_the_sharing():
    tasks = two_tasks().double()
    qkv = tasks.backbone.blocks[0].attn.qkv.weight
    assert qkv.dtype == torch.float64
    assert tasks["digits"].blocks[0].attn.qkv.base.weight is qkv
    assert tasks(images().double(), "digits").dtype == torch.float64


def test_save_and_reload_every_task_onto_a_fresh_backbone(tmp_path):
    tasks = two_tasks()
    x = images()
    with torch.no_grad():
        want = {n: tasks(x, n) for n in tasks.names}
    tasks.save(tmp_path)
    with pytest.raises(FileExistsError):
        tasks.save(tmp_path)
    again = MultiTaskModel.from_directory(tiny_model(), tmp_path).eval()
    assert sorted(again.names) == sorted(want)
    with torch.no_grad():
        for n, out in want.items():
            torch.testing.assert_close(again(x, n), out)
    # each task's folder is an ordinary adapter checkpoint
    fresh = tiny_model()
    fresh.reset_classifier(37)
    solo = vpeft.load(fresh, tmp_path / "pets").eval()
    with torch.no_grad():
        torch.testing.assert_close(solo(x), want["pets"])


def test_merging_a_task_gives_a_standalone_copy_and_refuses_in_place():
    tasks = two_tasks()
    x = images()
    backbone_before = tasks.backbone(x)
    with pytest.raises(ValueError, match="shares its frozen weights"):
        vpeft.merge(tasks["digits"], inplace=True)
    merged = vpeft.merge(tasks["digits"])
    assert merged.blocks[0].attn.qkv.weight is not tasks.backbone.blocks[0].attn.qkv.weight
    with torch.no_grad():
        torch.testing.assert_close(merged(x), tasks(x, "digits"), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tasks.backbone(x), backbone_before, rtol=0, atol=0)
    restored = vpeft.unmerge(merged, inplace=True)  # the copy owns its tensors: allowed
    assert isinstance(restored.blocks[0].attn.qkv, vpeft.core.surgery.Wrapper)


def test_bad_input_is_named():
    tasks = two_tasks()
    with pytest.raises(KeyError, match=r"no task 'cats'.*digits"):
        tasks(images(), "cats")
    with pytest.raises(ValueError, match="exists already"):
        tasks.add("digits", "linear")
    with pytest.raises(ValueError, match=r"without '\.'"):
        tasks.add("a.b", "linear")
    with pytest.raises(ValueError, match="plain backbone"):
        MultiTaskModel(vpeft.adapt(tiny_model(), "linear"))
    assert tasks.remove("pets") is not None and tasks.names == ["digits"]


def test_an_adapter_for_another_backbone_is_refused(tmp_path):
    vpeft.save(vpeft.adapt(tiny_model("deit-distilled"), "lora"), tmp_path / "a")
    tasks = MultiTaskModel(tiny_model("vit"))
    with pytest.raises(vpeft.CheckpointError, match="was made for"):
        tasks.load("a", tmp_path / "a")
    assert tasks.names == []
    with pytest.raises(FileNotFoundError, match="no saved adapters"):
        MultiTaskModel.from_directory(tiny_model(), tmp_path / "empty")


def test_same_class_count_head_is_owned_per_task():
    tasks = MultiTaskModel(tiny_model())
    a = tasks.add("a", "linear")
    b = tasks.add("b", "linear")
    heads = {id(m.head.weight) for m in (a, b, tasks.backbone)}
    assert len(heads) == 3
    assert a.head.weight.shape == (NUM_CLASSES, TINY_DIMS["embed_dim"])
