"""Video recognition: clip data (mp4 and frame folders), TSN sampling, the clip model, the
temporal methods (AIM, ST-Adapter) on clips, and video runs through train / eval / bench / report.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import vpeft
from vpeft.backbones.base import MissingPartError
from vpeft.cli import main
from vpeft.core.temporal import clip_frames
from vpeft.data import DataError
from vpeft.data.synthetic_video import MotionSpec, make_motion_data, mosaic, render
from vpeft.data.video import decode_video, tsn_indices
from vpeft.engine.config import TASK_NAMES
from vpeft.tasks import make_task, task_names
from vpeft.tasks.video import ClipModel

from conftest import IMG, NUM_CLASSES, saved_bytes, tiny_model
from rows import Row, all_rows

av = pytest.importorskip("av")

TEMPORAL = ["aim", "st-adapter"]
T = 4  # frames of the test clips


def clips(n: int = 2, frames: int = T, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, frames, 3, IMG, IMG, generator=g)


def clip_model(method: str | None, kind: str = "vit", **options) -> ClipModel:
    model = tiny_model(kind)
    if method is not None:
        vpeft.adapt(model, method, **options)
    return ClipModel(model)


def perturb(model: torch.nn.Module, seed: int = 0, keep: str | None = None) -> None:
    """Move every trainable tensor (but those whose name contains ``keep``) off its (zero) init,
    as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and not (keep and keep in n):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def sharpen_attention(model: torch.nn.Module, factor: float = 8.0) -> None:
    """Scale the frozen query/key projections: a random-init ViT attends almost uniformly, a
    pre-trained one does not (AIM reads frame order through the frozen attention pattern)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".qkv.weight"):
                q, k, _ = p.chunk(3)
                q.mul_(factor)
                k.mul_(factor)


@pytest.fixture(scope="module")
def motion(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny generated direction task, as mp4 and as frame folders."""
    root = tmp_path_factory.mktemp("video")
    spec = dict(kind="direction4", size=32, length=(3, 6), speed=4)
    sizes = {"train800": 8, "val200": 4, "test": 4}
    return {fmt: Path(make_motion_data(root / fmt, sizes, MotionSpec(fmt=fmt, **spec),
                                       seed=1)["folder"]) for fmt in ("mp4", "frames")}


# -- data -----------------------------------------------------------------------------------------
def test_generated_mp4_decodes_to_the_rendered_frames(tmp_path: Path):
    spec = MotionSpec(kind="direction", size=32, length=(6, 6), speed=4, fmt="mp4")
    make_motion_data(tmp_path, {"test": 1}, spec, seed=5)
    rng = np.random.default_rng(5)
    rng.permutation(np.arange(1) % 8)  # the generator's draws, in order
    label = int((tmp_path / "test.txt").read_text().split()[1])
    expected = render(rng, spec, label, mosaic(rng, spec, []))
    got = decode_video(tmp_path / "videos/test/000000.mp4", set(range(6)))
    assert sorted(got) == list(range(6))
    for k in range(6):
        diff = np.abs(np.asarray(got[k], dtype=float) - expected[k]).mean()
        assert diff < 6.0, f"frame {k} differs by {diff:.1f} grey levels on average"
    # the scroll is visible: consecutive frames differ, and by the direction's shift
    a, b = expected[0], expected[1]
    assert not np.array_equal(a, b)


def test_tsn_sampling_rules():
    assert tsn_indices(16, 4, [0.5] * 4) == [2, 6, 10, 14]  # centre of each segment
    assert tsn_indices(16, 4, [0.0] * 4) == [0, 4, 8, 12]
    assert tsn_indices(16, 4, [0.999] * 4) == [3, 7, 11, 15]
    short = tsn_indices(3, 8, [0.5] * 8)  # a short clip repeats frames, in order
    assert short == sorted(short) and set(short) == {0, 1, 2} and len(short) == 8


def test_dataset_sampling_train_random_eval_centre_and_views(motion):
    task = make_task("video", frames=T, views=3)
    train = task.open(motion["mp4"], "train800", train=True, seed=0)
    test = task.open(motion["mp4"], "test")
    assert train.views == 1 and test.views == 3
    n = train.lengths[0]
    for epoch in range(3):  # random place inside each segment, from (seed, epoch, index)
        train.set_epoch(epoch)
        for t, k in enumerate(train.indices(0)[0]):
            assert int(t * n / T) <= k < max(int((t + 1) * n / T), int(t * n / T) + 1)
    train.set_epoch(0)
    first = train.indices(1)
    train.set_epoch(1)
    assert train.indices(1) != first or train.lengths[1] <= T
    train.set_epoch(0)
    assert train.indices(1) == first
    views = test.indices(0)
    n = test.lengths[0]
    assert views == [tsn_indices(n, T, [(k + 0.5) / 3] * T) for k in range(3)]


def test_clips_from_mp4_and_frame_folders(motion):
    task = make_task("video", frames=T, views=2)
    transform = vpeft.data.eval_transform(vpeft.data.data_config(tiny_model("vit")))
    for fmt, root in motion.items():
        train = task.open(root, "train800", train=True)
        train.transform = transform
        x, y = train[0]
        assert x.shape == (T, 3, IMG, IMG) and 0 <= y < 4, fmt
        test = task.open(root, "test", classes=train.classes)
        test.transform = transform
        assert test[0][0].shape == (2, T, 3, IMG, IMG)


def _copy_task(src: Path, dst: Path, lines: list[str]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "classes.txt").write_text((src / "classes.txt").read_text())
    (dst / "test.txt").write_text("\n".join(lines) + "\n")
    return dst


def test_bad_clips_are_named_by_list_line(motion, tmp_path: Path):
    good = (motion["mp4"] / "test.txt").read_text().splitlines()[0].split()[0]
    task = make_task("video", frames=T)
    src = motion["mp4"]
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"\x00not a video" * 50)
    (tmp_path / "noframes").mkdir()
    cases = {
        f"{src / good} 9": "label 9 is out of range",
        f"{src}/frames/missing 0": "clip",
        f"{tmp_path}/empty.mp4 0": "cannot read video",
        f"{tmp_path}/junk.mp4 0": "cannot read video",
        f"{tmp_path}/noframes 0": "holds no images",
        f"{src}/classes.txt 0": "neither a folder of frames nor a video file",
    }
    for i, (line, message) in enumerate(cases.items()):
        root = _copy_task(src, tmp_path / f"case{i}", [f"{src / good} 0", line])
        with pytest.raises(DataError) as e:
            task.open(root, "test")
        assert message in str(e.value) and "test.txt:2" in str(e.value), (line, str(e.value))


def test_cli_bad_video_data_is_one_line_exit_2(motion, tmp_path: Path, capsys):
    root = _copy_task(motion["mp4"], tmp_path / "bad", ["videos/none.mp4 0"])
    (root / "train800val200.txt").write_text("videos/none.mp4 0\n")
    code = main(["train", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--data",
                 str(root), "--task", "video", "--method", "linear", "--out",
                 str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "train800val200.txt:1" in err and "Traceback" not in err


def test_task_names_agree_with_the_config():
    assert tuple(task_names()) == TASK_NAMES


# -- clip model and temporal methods -------------------------------------------------------------
@pytest.mark.parametrize("method", [None, "lora", *TEMPORAL])
def test_zero_init_is_the_frame_wise_base(method: str | None):
    base = tiny_model("vit").eval()
    model = clip_model(method).eval()
    x = clips()
    with torch.no_grad():
        ref = base(x.flatten(0, 1)).view(2, T, -1).mean(1)  # frame logits, averaged
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
        views = torch.stack([x, x.flip(1)], dim=1)  # (B, K, T, ...): views averaged
        assert model(views).shape == (2, NUM_CLASSES)


FIRST_ROW: dict[str, Row] = {}
for _row in all_rows():  # the matrix's options and backbone kind of each method
    FIRST_ROW.setdefault(_row.method, _row)


@pytest.mark.parametrize("method", sorted(FIRST_ROW))
def test_every_method_runs_frame_wise_on_clips(method: str):
    if vpeft.get_method(method).missing_requirements():
        pytest.skip(f"{method} needs {vpeft.get_method(method).requires}")
    row = FIRST_ROW[method]
    model = clip_model(method, row.backbones[0], **row.options)
    x = clips(2, frames=2)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", TEMPORAL)
def test_temporal_methods_see_frame_order_frame_wise_ones_do_not(method: str):
    x = clips()
    order = torch.tensor([2, 0, 3, 1])
    temporal, framewise = clip_model(method).eval(), clip_model("lora").eval()
    sharpen_attention(temporal)
    perturb(temporal)
    perturb(framewise)
    with torch.no_grad():
        assert not torch.allclose(temporal(x), temporal(x[:, order]), atol=1e-4)
        torch.testing.assert_close(framewise(x), framewise(x[:, order]), rtol=1e-5, atol=1e-5)
        # and clips do not leak into each other: clip 0 alone gives the same logits
        torch.testing.assert_close(temporal(x[:1]), temporal(x)[:1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", TEMPORAL)
def test_on_clips_only_method_tensors_and_head_train(method: str, tmp_path: Path):
    model = clip_model(method)
    backbone = model.backbone
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    before = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.0)
    live: set[str] = set()
    x, y = clips(4), torch.arange(4) % NUM_CLASSES
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for n, p in backbone.named_parameters():
            assert p.requires_grad or p.grad is None, f"frozen {n} got a gradient"
        live |= {n for n, p in backbone.named_parameters() if p.grad is not None and p.grad.any()}
        opt.step()
    assert trainable == live, f"never got a gradient: {sorted(trainable - live)}"
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]) != (k in trainable), k
    vpeft.save(backbone, tmp_path / "adapter")  # the backbone is what is saved, as for images
    restored = ClipModel(vpeft.load(tiny_model("vit"), tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model.eval()(x))


def _aim_grads(model: ClipModel, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), torch.arange(len(x)) % NUM_CLASSES).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def test_aim_learns_order_from_the_first_step():
    """Why AIM stayed at chance on the motion benchmark, and the fix. With the official code's
    placement (a zero-init embedding added to the input tokens), the zero-init model is invariant
    to frame order, so at init every adapter's gradient is the same for a clip and its reverse:
    order can only enter as (embedding x up-projection), both zero, a saddle. With the embedding
    inside the temporal attention (random init, default), the temporal adapters' up-projections
    get an order-dependent gradient at once, while the model still starts as the frame-wise base
    (``test_zero_init_is_the_frame_wise_base``)."""
    torch.manual_seed(0)
    x = clips()
    official = clip_model("aim", embed_at="input")
    fwd, rev = _aim_grads(official, x), _aim_grads(official, x.flip(1))
    adapters = [n for n in fwd if "time_embed" not in n and "head" not in n]
    assert adapters and all(fwd[n].abs().sum() > 0 for n in adapters if ".up." in n)
    for n in adapters:
        torch.testing.assert_close(fwd[n], rev[n], rtol=1e-4, atol=1e-7, msg=n)
    model = clip_model("aim")
    sharpen_attention(model)
    fwd, rev = _aim_grads(model, x), _aim_grads(model, x.flip(1))
    temporal_up = [n for n in fwd if n.endswith("adapter.up.weight")]
    assert temporal_up
    for n in temporal_up:
        assert not torch.allclose(fwd[n], rev[n], rtol=1e-3, atol=1e-6), n


def test_aim_recompute_gives_the_same_gradients_and_keeps_less():
    """``recompute`` (the default) keeps only each temporal branch's input and replays its norm,
    attention over time and adapter in the backward: the same output and gradients (the frame
    count comes with the replay, outside the clip's context), with less kept."""
    x = clips()
    runs = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        model = clip_model("aim", recompute=recompute).train()
        perturb(model)
        kept, out = saved_bytes(lambda m=model: m(x))
        out.square().mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        runs[recompute] = kept, out, grads
    (kept_all, out_all, g_all), (kept_re, out_re, g_re) = runs[False], runs[True]
    torch.testing.assert_close(out_re, out_all, rtol=0, atol=0)
    assert g_re.keys() == g_all.keys() and any("time_embed" in n for n in g_all)
    for n in g_all:
        torch.testing.assert_close(g_re[n], g_all[n], rtol=1e-6, atol=1e-7, msg=n)
    assert kept_re < 0.85 * kept_all


@pytest.mark.parametrize("embed_at,sees_order", [("temporal", True), ("input", False)])
def test_aim_sees_order_only_through_its_embedding(embed_at: str, sees_order: bool):
    """Every adapter and the head off their init, the embedding left at its init: reversing the
    frames changes the logits when the (random-init) embedding is inside the temporal attention;
    with the official placement (the embedding still zero) the frozen attention over frames is
    permutation-equivariant and the mean over frames makes the clip model exactly order-blind."""
    torch.manual_seed(0)
    model = clip_model("aim", embed_at=embed_at).eval()
    sharpen_attention(model)
    perturb(model, keep="time_embed")
    with torch.no_grad():
        x = clips()
        same = torch.allclose(model(x), model(x.flip(1)), rtol=1e-5, atol=1e-5)
    assert same != sees_order


def test_aim_temporal_embedding_resamples_to_other_lengths():
    model = clip_model("aim", frames=8).eval()
    perturb(model)
    with torch.no_grad():
        assert model(clips(frames=3)).shape == (2, NUM_CLASSES)
        with clip_frames(5), pytest.raises(ValueError, match="a whole number of 5-frame clips"):
            model.backbone(torch.randn(7, 3, IMG, IMG))


@pytest.mark.parametrize("method", TEMPORAL)
@pytest.mark.parametrize("kind", ["resnet", "convnext", "swin"])
def test_temporal_methods_on_non_token_backbones_say_what_is_missing(method: str, kind: str):
    with pytest.raises(MissingPartError, match="sequence_tokens"):
        vpeft.adapt(tiny_model(kind), method)


@pytest.mark.parametrize("method,expected,published", [
    ("aim", 10_657_536, 11.0),  # 3 adapters (768 -> 192 -> 768) x 12 + 8 x 768 embedding
    ("st-adapter", 7_110_144, 7.1),  # 12 x (768 -> 384, 3-tap depthwise conv, 384 -> 768)
])
def test_vit_b16_parameter_counts_match_the_papers(method: str, expected: int,
                                                   published: float):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = timm.create_model("vit_base_patch16_224", num_classes=400)
        vpeft.adapt(model, method)
    s = vpeft.summary(model)
    assert s.trainable_no_head == expected
    head = 768 * 400 + 400  # Kinetics-400 classifier
    assert s.trainable == expected + head
    # the papers' counts (AIM: 11M with the K400 head, ST-Adapter: 7.1M besides it)
    counted = s.trainable if method == "aim" else s.trainable_no_head
    assert round(counted / 1e6, 1) == published


# -- runs: train / eval / bench / report ----------------------------------------------------------
TINY_RUN = {"model": "vit_tiny_patch16_224", "pretrained": False, "img_size": IMG,
            "model_args": {"patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 3},
            "epochs": 1, "batch_size": 4, "num_workers": 0, "progress": False}


def test_video_run_train_eval_bench_report(motion, tmp_path: Path, capsys):
    from vpeft.bench.report import collect
    from vpeft.bench.runner import run_suite
    from vpeft.bench.suites import MethodEntry, Suite
    from vpeft.engine import TrainConfig, evaluate_run, train

    data = tmp_path / "data"
    data.mkdir()
    (data / "motion").symlink_to(motion["frames"])
    results = train(TrainConfig(data=str(data / "motion"), method="st-adapter", task="video",
                                frames=T, views=2, out=str(tmp_path / "run"), **TINY_RUN))
    assert (results["task"], results["frames"], results["views"]) == ("video", T, 2)
    assert results["eval_images"] == 4 and results["trainable_params_no_head"] > 0
    again = evaluate_run(tmp_path / "run", show_progress=False)
    assert again["task"] == "video" and again["top1"] == results["top1"]
    # a suite mixing an image task and this video task
    from datagen import write_list_dataset

    write_list_dataset(data / "colours", {"train800": 8, "val200": 4, "test": 4}, classes=4)
    suite = Suite(name="mixed", tasks=["colours", "motion"],
                  methods=[MethodEntry("linear")], model=TINY_RUN["model"], epochs=1,
                  img_size=IMG, batch_size=4,
                  train={k: v for k, v in TINY_RUN.items()
                         if k not in ("model", "epochs", "batch_size", "img_size")},
                  task_train={"motion": {"task": "video", "frames": T}})
    run_suite(suite, data, tmp_path / "bench", progress=False)
    rows = {r["task"]: r for r in collect(tmp_path / "bench")}
    assert rows["motion"]["application"] == "video" and rows["motion"]["frames"] == T
    assert rows["colours"]["application"] == "image"
    assert main(["report", str(tmp_path / "bench"), "--out", str(tmp_path / "report")]) == 0
    assert "motion" in (tmp_path / "report" / "report.md").read_text()
    capsys.readouterr()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["frames"] == T
