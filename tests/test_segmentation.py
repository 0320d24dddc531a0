"""Semantic segmentation: decoders in the head's place, loss, mIoU, sliding windows, and runs
(train / eval / predict / bench / report / profile) on generated masks."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vpeft
from vpeft.cli import main
from vpeft.tasks import make_task
from vpeft.tasks.decoders import FPNDecoder, LinearDecoder, feature_blocks
from vpeft.tasks.segmentation import (
    IGNORE,
    PAD,
    ConfusionMatrix,
    collate_masks,
    mask_size,
    segmentation_loss,
    slide,
)

from conftest import IMG, tiny_model

# the methods the issue names, on a plain and on hierarchical families
SEG_METHODS = ["linear", "bitfit", "lora", "adaptformer", "ssf", "full", "mona", "e3va"]
SEG_KINDS = ["vit", "swin", "convnext"]


def seg_model(kind: str, method: str | None = None, decoder: str = "fpn") -> torch.nn.Module:
    model = tiny_model(kind)
    make_task("segmentation", decoder=decoder, decoder_width=16).build(model)
    if method is not None:
        vpeft.adapt(model, method)
    return model


# -- decoders -------------------------------------------------------------------------------------
def test_feature_blocks_plain_evenly_spaced_hierarchical_stage_ends():
    view = vpeft.get_view(tiny_model("vit"))
    view.blocks, view.block_dims = [f"b{i}" for i in range(12)], [8] * 12
    assert feature_blocks(view) == [2, 5, 8, 11]
    view.block_dims = [8, 8, 16, 16, 16, 32, 64, 64]
    view.blocks = view.blocks[:8]
    assert feature_blocks(view) == [1, 4, 5, 7]  # the last block of each stage


@pytest.mark.parametrize("kind", [*SEG_KINDS, "resnet"])
@pytest.mark.parametrize("decoder", ["linear", "fpn"])
def test_decoder_is_the_head_and_returns_dense_logits(kind: str, decoder: str):
    model = seg_model(kind, decoder=decoder)
    head = model.get_submodule(vpeft.get_view(model).heads[0])
    assert isinstance(head, LinearDecoder if decoder == "linear" else FPNDecoder)
    x = torch.randn(2, 3, IMG, IMG)
    logits = model(x)
    assert logits.ndim == 4 and logits.shape[:2] == (2, model.num_classes)
    # the logits depend on where things are: a flipped image gives other logits
    assert not torch.allclose(model(x.flip(-1)), logits)


def test_decoder_reads_the_blocks_of_each_forward_and_survives_copies():
    model = seg_model("vit", "lora")
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, IMG, IMG)
    model.eval()
    twin.eval()
    torch.testing.assert_close(twin(x), model(x))
    with torch.no_grad():  # change the copy's last block: only the copy's output changes
        last = vpeft.get_view(twin).blocks[-1]
        for p in twin.get_submodule(last).parameters():
            p.add_(0.5)
    assert not torch.allclose(twin(x), model(x))
    assert all(not m._forward_hooks for m in model.modules() if m is not model)  # taps removed


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_save_load_and_merge_keep_the_decoder(kind: str, tmp_path: Path):
    model = seg_model(kind, "lora")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    model.eval()
    x = torch.randn(2, 3, IMG, IMG)
    vpeft.save(model, tmp_path / "a")
    fresh = tiny_model(kind)
    make_task("segmentation", decoder="fpn", decoder_width=16).build(fresh)
    vpeft.load(fresh, tmp_path / "a")
    fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))
    torch.testing.assert_close(vpeft.merge(model).eval()(x), model(x), atol=1e-5, rtol=1e-4)


def test_two_headed_models_are_refused():
    with pytest.raises(ValueError, match="one classifier head"):
        seg_model("deit-distilled")


# -- every method of the issue, on a plain and a hierarchical family ----------------------------
@pytest.mark.parametrize("kind", SEG_KINDS)
@pytest.mark.parametrize("method", SEG_METHODS)
def test_methods_train_on_masks(kind: str, method: str):
    try:
        model = seg_model(kind, method)
    except vpeft.MissingPartError as e:
        pytest.skip(f"{method} does not apply to {kind}: {e}")  # the matrix covers applicability
    model.train()
    x = torch.randn(2, 3, IMG, IMG)
    masks = torch.randint(0, model.num_classes, (2, IMG, IMG))
    loss = segmentation_loss(model(x), masks)
    loss.backward()
    state = vpeft.get_state(model)
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum()}
    head = {n for n in trained if n in state.head_keys}
    assert head, "the decoder must train"
    if method != "linear":  # the method's own tensors get a gradient too
        assert trained - head
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not trained & frozen


def test_the_methods_of_the_issue_apply_to_vit_and_swin():
    for method in SEG_METHODS:
        for kind in ("vit", "swin"):
            seg_model(kind, method)  # raises if a method cannot adapt a segmentation model


# -- loss and metric ------------------------------------------------------------------------------
def test_loss_ignores_255_and_padding():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    mask = torch.randint(0, 3, (1, 8, 8))
    mask[0, :2] = IGNORE
    mask[0, -2:] = PAD
    other = mask.clone()
    other[0, :2] = PAD
    assert torch.equal(segmentation_loss(logits, mask), segmentation_loss(logits, other))
    empty = torch.full((1, 8, 8), IGNORE)
    loss = segmentation_loss(logits, empty)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_confusion_matrix_scores_by_hand():
    m = ConfusionMatrix(["bg", "a", "b", "never"])
    truth = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, PAD]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 3]])
    m.update(pred, truth)
    s = m.scores()
    # bg: tp 1, union 3 -> 1/3; a: tp 2, union 3; b: tp 1, union 2; never: no pixel of it is
    # labelled or predicted where labels count -> left out
    assert s["per_class_iou"] == {"bg": pytest.approx(100 / 3, abs=1e-3),
                                  "a": pytest.approx(200 / 3, abs=1e-3), "b": 50.0, "never": None}
    assert s["miou"] == pytest.approx((100 / 3 + 200 / 3 + 50) / 3)
    assert s["pixel_accuracy"] == pytest.approx(100 * 4 / 6)


def test_collate_pads_masks_so_their_size_is_known():
    a = (torch.zeros(3, 4, 4), torch.zeros(4, 6, dtype=torch.long))
    b = (torch.zeros(3, 4, 4), torch.full((5, 3), IGNORE))
    _, masks = collate_masks([a, b])
    assert masks.shape == (2, 5, 6)
    assert mask_size(masks[0]) == (4, 6) and mask_size(masks[1]) == (5, 3)


def test_sliding_windows_equal_the_whole_image_for_a_pointwise_model():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 4, 1)  # the logits of a pixel depend on that pixel only
    x = torch.randn(1, 3, 20, 33)
    torch.testing.assert_close(slide(net, x, 8), net(x))


def test_infer_brings_logits_to_each_masks_full_resolution():
    task = make_task("segmentation", decoder="linear")
    net = torch.nn.Conv2d(3, 2, 4, stride=4)  # stride-4 logits
    images = torch.randn(2, 3, 16, 16)
    masks = torch.full((2, 30, 40), PAD)
    masks[0, :30, :40] = 0
    masks[1, :20, :10] = 1
    out = task.infer(net, images, masks, 16)
    assert out.shape == (2, 2, 30, 40)
    assert (out[1, :, 20:, :] == 0).all() and (out[1, :, :20, :10] != 0).any()


# -- runs ------------------------------------------------------------------------------------------
TINY_RUN = {"model": "vit_tiny_patch16_224", "pretrained": False, "img_size": IMG,
            "model_args": {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3},
            "epochs": 1, "batch_size": 4, "num_workers": 0, "progress": False,
            "task": "segmentation", "train_split": "train", "eval_split": "val",
            "decoder_width": 16}


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory) -> Path:
    from vpeft.data.synthetic_seg import SegSpec, make_seg_data

    root = tmp_path_factory.mktemp("seg") / "shapes"
    make_seg_data(root, {"train": 8, "val": 4, "test": 4}, SegSpec(size=40, max_classes=3),
                  seed=0)
    return root


def test_segmentation_run_train_eval_predict_report(seg_data: Path, tmp_path: Path, capsys):
    from vpeft.bench.report import collect
    from vpeft.engine import TrainConfig, evaluate_run, train

    results = train(TrainConfig(data=str(seg_data), method="lora", out=str(tmp_path / "run"),
                                **TINY_RUN))
    assert results["task"] == "segmentation" and results["metric"] == "miou"
    assert 0 <= results["miou"] <= 100 and 0 <= results["pixel_accuracy"] <= 100
    classes = (seg_data / "classes.txt").read_text().split()
    assert list(results["per_class_iou"]) == classes and "top1" not in results
    again = evaluate_run(tmp_path / "run", show_progress=False)
    assert again["miou"] == pytest.approx(results["miou"])
    slid = evaluate_run(tmp_path / "run", split="test", show_progress=False)
    assert slid["images"] == 4
    # predict: a mask of class indices and an overlay per image, at the image's own size
    out = tmp_path / "masks"
    assert main(["predict", "--run", str(tmp_path / "run"), "--images",
                 str(seg_data / "img_dir" / "test"), "--out", str(out), "--no-progress"]) == 0
    first = sorted((seg_data / "img_dir" / "test").iterdir())[0]
    mask = np.asarray(Image.open(out / f"{first.stem}.png"))
    assert mask.shape == Image.open(first).size[::-1] and mask.max() < len(classes)
    assert Image.open(out / f"{first.stem}_overlay.png").size == Image.open(first).size
    code = main(["predict", "--run", str(tmp_path / "run"), "--images",
                 str(seg_data / "img_dir" / "test"), "--out", str(out), "--no-progress"])
    assert code == 2 and "exists" in capsys.readouterr().err  # never replaced silently
    rows = collect(tmp_path)
    assert rows[0]["metric"] == "miou" and rows[0]["application"] == "segmentation"
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    assert "mIoU (%)" in (tmp_path / "report" / "report.md").read_text()


def test_segmentation_bench_suite_and_sliding_eval(seg_data: Path, tmp_path: Path):
    from vpeft.bench.report import collect
    from vpeft.bench.runner import run_suite
    from vpeft.bench.suites import MethodEntry, Suite

    data = tmp_path / "data"
    data.mkdir()
    (data / "shapes").symlink_to(seg_data)
    train_opts = {k: v for k, v in TINY_RUN.items()
                  if k not in ("model", "epochs", "batch_size", "img_size", "task",
                               "train_split", "eval_split")}
    suite = Suite(name="seg", tasks=["shapes"], methods=[MethodEntry("bitfit")],
                  model=TINY_RUN["model"], epochs=1, img_size=IMG, batch_size=4,
                  train=train_opts,
                  task_train={"shapes": {"task": "segmentation", "train_split": "train",
                                         "eval_split": "test", "eval_mode": "slide"}})
    run_suite(suite, data, tmp_path / "bench", progress=False)
    (row,) = collect(tmp_path / "bench")
    assert row["task"] == "shapes" and row["metric"] == "miou" and row["eval_mode"] == "slide"


def test_probe_start_is_refused_for_masks(seg_data: Path, tmp_path: Path):
    from vpeft.engine import TrainConfig, train

    with pytest.raises(ValueError, match="head_init=probe"):
        train(TrainConfig(data=str(seg_data), method="lora", out=str(tmp_path / "run"),
                          head_init="probe", **TINY_RUN))


def test_profile_runs_the_segmentation_step():
    from vpeft.bench.profile import ProfileSpec, build, profile

    spec = ProfileSpec(model="vit_tiny_patch16_224", batch_size=2, img_size=IMG, num_classes=3,
                       model_args={"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3},
                       warmup=0, repeats=1, memory=False, task="segmentation",
                       task_options={"decoder": "fpn", "decoder_width": 16})
    result = profile(spec, [("lora", {})])
    (row,) = result["methods"]
    assert row["trainable_params"] == vpeft.summary(build(spec, "lora")).trainable
    assert row["step_ratio_floor"] > 0 and row["latency_ratio_merged"] > 0
