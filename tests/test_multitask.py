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


# -- the PEFT-like interface ----------------------------------------------------------------------
def test_set_adapter_switches_outputs_and_disable_gives_the_base_model_exactly():
    tasks = two_tasks()
    x = images()
    with torch.no_grad():
        with pytest.raises(ValueError, match="no active adapter"):
            tasks(x)
        tasks.set_adapter("digits")
        torch.testing.assert_close(tasks(x), tasks["digits"](x), rtol=0, atol=0)
        tasks.set_adapter("pets")
        assert tasks.active_adapter == "pets"
        torch.testing.assert_close(tasks(x), tasks["pets"](x), rtol=0, atol=0)
        base = tiny_model().eval()(x)  # the untouched backbone, its own head included
        assert not torch.equal(tasks(x, "digits")[:, :NUM_CLASSES], base)
        with tasks.disable_adapter():
            torch.testing.assert_close(tasks(x), base, rtol=0, atol=0)
            torch.testing.assert_close(tasks(x, task="digits"), base, rtol=0, atol=0)
        torch.testing.assert_close(tasks(x), tasks["pets"](x), rtol=0, atol=0)  # back on
    with pytest.raises(KeyError, match="no task 'cats'"):
        tasks.set_adapter("cats")


def test_delete_adapter_frees_its_tensors():
    import gc
    import weakref

    tasks = two_tasks()
    tasks.set_adapter("digits")
    gone = weakref.ref(tasks["digits"].blocks[0].attn.qkv.lora_A)
    before = sum(p.numel() for p in tasks.parameters())
    own = tasks.parameter_counts()["digits"]
    tasks.delete_adapter("digits")
    gc.collect()
    assert gone() is None and tasks.names == ["pets"] and tasks.active_adapter is None
    assert sum(p.numel() for p in tasks.parameters()) == before - own
    assert tasks(images(), "pets").shape == (3, 37)


def _deltas(tasks: MultiTaskModel, name: str) -> dict[str, torch.Tensor]:
    """Every weight's change by task ``name``'s merged update (head excluded)."""
    merged = vpeft.merge(tasks[name]).state_dict()
    base, view = tasks.backbone.state_dict(), vpeft.get_view(tasks.backbone)
    return {k: merged[k] - v for k, v in base.items()
            if k in merged and v.is_floating_point() and not view.in_head(k)}


@pytest.mark.parametrize("kind, options", [("vit", {}), ("vit", {"qkv": "qv"}),
                                           ("resnext", {})], ids=["fused", "qv", "grouped-conv"])
def test_weighted_lora_combination_equals_the_weighted_sum_of_the_updates(kind, options):
    tasks = MultiTaskModel(tiny_model(kind).eval())
    randomize(tasks.add("a", "lora", rank=2, **options))
    randomize(tasks.add("b", "lora", rank=3, alpha=1.5, **options))
    tasks.eval()
    mix = tasks.add_weighted_adapter(["a", "b"], [0.7, -1.3], "mix", head_from="b")
    assert vpeft.get_state(mix).config.rank == 5
    a, b, got = _deltas(tasks, "a"), _deltas(tasks, "b"), _deltas(tasks, "mix")
    changed = [k for k in got if a[k].abs().max() > 0]
    assert changed, "the LoRA updates reach no weight"
    for k in got:
        torch.testing.assert_close(got[k], 0.7 * a[k] - 1.3 * b[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mix.state_dict()[_head(mix)], tasks["b"].state_dict()[_head(mix)])


def _head(model: torch.nn.Module) -> str:
    return sorted(vpeft.get_state(model).head_keys)[0]


def test_weighted_combination_refuses_what_it_cannot_express():
    tasks = two_tasks()
    randomize(tasks.add("qv", "lora", rank=2, qkv="qv", num_classes=10))
    with pytest.raises(ValueError, match="only LoRA adapters"):
        tasks.add_weighted_adapter(["digits", "pets"], [1, 1], "x")
    with pytest.raises(ValueError, match="differ in qkv"):
        tasks.add_weighted_adapter(["digits", "qv"], [1, 1], "x")
    with pytest.raises(ValueError, match="one weight per adapter"):
        tasks.add_weighted_adapter(["digits"], [1, 2], "x")
    assert "x" not in tasks.names


# -- mixed-task batches ---------------------------------------------------------------------------
def test_a_mixed_task_batch_gives_each_image_its_own_tasks_logits():
    tasks = two_tasks()
    randomize(tasks.add("prompts", "vpt-deep", num_classes=4))
    tasks.eval()
    x = images(6)
    names = ["pets", "digits", "prompts", "digits", "pets", "digits"]
    with torch.no_grad():
        out = tasks(x, task=names)
        assert [o.shape[0] for o in out] == [37, 10, 4, 10, 37, 10]
        for name in set(names):
            index = [i for i, n in enumerate(names) if n == name]
            alone = tasks(x[index], task=name)  # the task run alone on its images
            for j, i in enumerate(index):
                torch.testing.assert_close(out[i], alone[j], rtol=0, atol=0)
                torch.testing.assert_close(out[i], tasks(x[i : i + 1], task=name)[0])
        with pytest.raises(ValueError, match="one per image"):
            tasks(x, task=names[:-1])
        with pytest.raises(KeyError, match="no task 'cats'"):
            tasks(x, task=[*names[:-1], "cats"])


# -- the same interface on one adapted model ------------------------------------------------------
@pytest.mark.parametrize("kind, method, options", [
    ("vit", "lora", {"rank": 2}), ("vit", "vpt-deep", {}), ("effnet", "visual-prompt", {}),
], ids=["lora", "vpt-deep", "cnn-visual-prompt"])
def test_disable_adapter_on_an_adapted_model_gives_the_base_model_exactly(kind, method, options):
    model = vpeft.adapt(tiny_model(kind).eval(), method, **options)
    randomize(model)  # the head too: disabled, the head is the base model's again
    x = images()
    with torch.no_grad():
        adapted = model(x)
        base = tiny_model(kind).eval()(x)
        assert not torch.allclose(adapted, base)
        with vpeft.disable_adapter(model) as plain:
            torch.testing.assert_close(plain(x), base, rtol=0, atol=0)
            assert vpeft.get_state(plain, required=False) is None
        torch.testing.assert_close(model(x), adapted, rtol=0, atol=0)
        model.double()  # moved after adapt(): buffers (BatchNorm statistics) follow
        with vpeft.disable_adapter(model) as plain:
            torch.testing.assert_close(plain(x.double()), tiny_model(kind).eval().double()(
                x.double()), rtol=0, atol=0)
    assert vpeft.summary(model).trainable > 0


def test_an_adapted_model_joins_a_multitask_model_with_its_base():
    model = vpeft.adapt(tiny_model().eval(), "lora", rank=2)
    randomize(model)
    x = images()
    with torch.no_grad():
        alone = model(x)
        tasks = MultiTaskModel.from_adapted(model)
        assert tasks.active_adapter == "default" and tasks["default"] is model
        assert tasks.backbone.blocks[0].attn.qkv.weight is model.blocks[0].attn.qkv.base.weight
        torch.testing.assert_close(tasks(x), alone, rtol=0, atol=0)
        randomize(tasks.add_adapter("other", "adapter"))
        tasks.set_adapter("other")
        torch.testing.assert_close(tasks(x), tasks["other"](x), rtol=0, atol=0)
        with tasks.disable_adapter():
            torch.testing.assert_close(tasks(x), tiny_model().eval()(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="shares its frozen weights"):
        vpeft.merge(model, inplace=True)


def test_disable_adapter_refuses_methods_that_train_the_backbone_in_place():
    model = vpeft.adapt(tiny_model(), "bitfit")
    with pytest.raises(ValueError, match="trains the backbone's own tensors in place"), \
            vpeft.disable_adapter(model):
        pass


def test_head_only_tasks_share_one_backbone_pass_in_a_mixed_batch():
    """Linear probes compute the backbone's own features: a mixed batch runs the backbone once
    for all of them (counted at the patch embedding), and each image still gets exactly what
    its task computes alone; a task that changes the forward (LoRA) runs its own group."""
    tasks = two_tasks()
    randomize(tasks.add("probe-a", "linear", num_classes=3))
    randomize(tasks.add("probe-b", "linear", num_classes=6))
    tasks.eval()
    assert tasks.reads_backbone_features("probe-a") and tasks.reads_backbone_features("probe-b")
    assert not tasks.reads_backbone_features("digits")  # LoRA wraps qkv
    assert not tasks.reads_backbone_features("pets")  # BitFit owns copies of the biases
    calls = []
    hooks = [m.patch_embed.register_forward_hook(lambda *a, m=m: calls.append(m))
             for m in (tasks.backbone, *tasks.tasks.values())]
    x = images(5)
    names = ["probe-b", "digits", "probe-a", "probe-b", "digits"]
    with torch.no_grad():
        out = tasks(x, task=names)
        embeds = len(calls)
        for h in hooks:
            h.remove()
        for i, name in enumerate(names):
            torch.testing.assert_close(out[i], tasks(x[i : i + 1], task=name)[0])
    assert embeds == 2  # one shared pass for both probes, one for the LoRA group
