"""The default linear probe (engine/probe.py): fitted to convergence, L2 chosen on held-out
training data only, as good as a tuned scikit-learn logistic regression."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from datagen import TINY_MODEL, write_list_dataset
from vpeft.engine import train
from vpeft.engine.config import TrainConfig
from vpeft.engine.probe import fit_probe, stratified_folds

sklearn_linear = pytest.importorskip("sklearn.linear_model")


def blobs(n: int, informative: int, noise_dims: int, classes: int = 4,
          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian classes in ``informative`` dimensions (the same means for every seed) plus
    ``noise_dims`` dimensions of pure noise: more noise dimensions need more regularisation."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, informative, generator=torch.Generator().manual_seed(99))
    y = torch.arange(n) % classes
    x = torch.cat([torch.randn(n, informative, generator=g) + means[y],
                   torch.randn(n, noise_dims, generator=g)], 1)
    return x, y


def sklearn_tuned_top1(x, y, xt, yt) -> float:
    """LogisticRegression with C chosen on the last 20% of the training data, refitted on all."""
    cut = int(0.8 * len(y))
    grid = [10.0**e for e in range(-4, 5)]

    def fit(c, a, b):
        return sklearn_linear.LogisticRegression(C=c, max_iter=5000).fit(a.numpy(), b.numpy())

    scores = [fit(c, x[:cut], y[:cut]).score(x[cut:].numpy(), y[cut:].numpy()) for c in grid]
    best = grid[max(range(len(grid)), key=scores.__getitem__)]
    return 100.0 * fit(best, x, y).score(xt.numpy(), yt.numpy())


@pytest.mark.parametrize("noise_dims", [0, 300])
def test_probe_reaches_a_tuned_logistic_regression(noise_dims: int) -> None:
    x, y = blobs(300, 4, noise_dims, seed=1)
    xt, yt = blobs(2000, 4, noise_dims, seed=2)
    head = nn.Linear(x.shape[1], 4)
    result = fit_probe(head, x, y, seed=0)
    with torch.no_grad():
        ours = 100.0 * (head(xt).argmax(-1) == yt).float().mean().item()
    theirs = sklearn_tuned_top1(x, y, xt, yt)
    assert ours >= theirs - 1.5, (ours, theirs, result)
    # converged: the penalised objective's gradient is ~0 where it stopped
    head.zero_grad()
    loss = nn.functional.cross_entropy(head(x), y) + result.l2_absolute / 2 * head.weight.pow(
        2).sum()
    loss.backward()
    assert head.weight.grad.abs().max() < 1e-3 and abs(result.train_loss - loss.item()) < 1.0


def test_l2_is_chosen_by_validation_more_noise_more_penalty() -> None:
    """The same classes with more and more pure-noise dimensions: cross-validation picks a
    stronger L2 each time (a fixed default could not)."""
    chosen = [fit_probe(nn.Linear(4 + d, 4), *blobs(200, 4, d, seed=1), seed=0).l2
              for d in (0, 30, 300)]
    assert chosen[0] < chosen[1] < chosen[2], chosen


def test_probe_is_deterministic_and_folds_are_stratified() -> None:
    x, y = blobs(120, 4, 20, seed=3)
    heads = [nn.Linear(24, 4) for _ in range(2)]
    heads[1].load_state_dict(heads[0].state_dict())
    a, b = (fit_probe(h, x, y, seed=5) for h in heads)
    assert a == b and torch.equal(heads[0].weight, heads[1].weight)
    folds = stratified_folds(y, 5, seed=5)
    per_class_fold = torch.zeros(4, 5)
    per_class_fold.index_put_((y, folds), torch.ones(len(y)), accumulate=True)
    assert per_class_fold.max() - per_class_fold.min() <= 1  # 30 per class: 6 in every fold


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_list_dataset(tmp_path_factory.mktemp("probe-data"),
                              {"train800": 40, "val200": 20, "test": 24}, classes=4)


def linear_run(data: Path, out: Path, **changes) -> TrainConfig:
    values = dict(model="vit_tiny_patch16_224", model_args=dict(TINY_MODEL), pretrained=False,
                  data=str(data), method="linear", out=str(out), epochs=2, batch_size=8,
                  num_workers=0, progress=False)
    return TrainConfig(**{**values, **changes})


def test_engine_probe_writes_its_choice_and_never_reads_the_eval_split(data: Path,
                                                                       tmp_path: Path) -> None:
    """``vpeft train --method linear`` fits by the probe and records it; an evaluation split
    with other labels changes the score, never the fitted head (it is not read for the fit)."""
    first = train(linear_run(data, tmp_path / "a"))
    other = tmp_path / "other-data"
    shutil.copytree(data, other)
    test_list = (other / "test.txt").read_text().splitlines()
    flipped = [f"{line.split()[0]} {(int(line.split()[1]) + 1) % 4}" for line in test_list]
    (other / "test.txt").write_text("\n".join(flipped) + "\n")
    second = train(linear_run(other, tmp_path / "b"))
    assert first["probe"] == second["probe"]  # same l2, iterations, loss, CV scores
    assert first["probe"]["solver"] == "lbfgs" and first["probe"]["l2"] > 0
    assert first["top1"] + second["top1"] <= 100.0 + 1e-6  # the labels did change
    line = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["l2"] == first["probe"]["l2"] and line["iterations"] >= 1
    assert line["loss"] == pytest.approx(first["probe"]["train_loss"])


def test_engine_probe_beats_the_epoch_loop_at_its_own_objective(data: Path,
                                                                tmp_path: Path) -> None:
    """The old default (two epochs of AdamW on the cached features) stops far above the loss the
    probe reaches; ``head_solver=sgd`` keeps it available."""
    probe = train(linear_run(data, tmp_path / "p"))
    sgd = train(linear_run(data, tmp_path / "s", head_solver="sgd"))
    sgd_loss = json.loads((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    assert sgd["probe"] is None
    assert probe["probe"]["train_loss"] < sgd_loss - 0.1, (probe["probe"], sgd_loss)


def test_head_solver_is_validated() -> None:
    with pytest.raises(ValueError, match="head_solver must be one of lbfgs, sgd"):
        linear_run(Path("."), Path("x"), head_solver="adam")


def start_of(data: Path, out: Path, head_init: str) -> tuple[dict, nn.Module]:
    """A one-epoch LoRA run; its results and a copy of the model as the first step saw it."""
    seen: list[nn.Module] = []
    results = train(linear_run(data, out, method="lora", head_init=head_init, epochs=1),
                    before_step=lambda m: seen or seen.append(copy.deepcopy(m)))
    return results, seen[0]


def head_gradient(model: nn.Module, data: Path, l2_absolute: float) -> float:
    """Largest |gradient| of the probe's objective (cross-entropy + l2 / 2 ||W||^2) at the
    model's head, on the pre-logits features of the training split."""
    from vpeft.data import data_config, eval_transform, open_dataset

    ds = open_dataset(str(data), "train800val200")
    ds.transform = eval_transform(data_config(model, None))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    model.eval()
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    head = model.get_classifier()
    head.zero_grad()
    loss = nn.functional.cross_entropy(head(feats), y) + l2_absolute / 2 * head.weight.pow(2).sum()
    loss.backward()
    return max(p.grad.abs().max().item() for p in head.parameters())


def test_head_init_probe_starts_training_at_the_probe_solution(data: Path, tmp_path: Path) -> None:
    """LP-FT: with ``head_init=probe`` the first step of LoRA sees the head at the probe's optimum
    (zero gradient of its objective) while LoRA's own parameters are untouched (B still zero) and
    train as before; the random head is far from it. The choice is recorded."""
    lpft, first = start_of(data, tmp_path / "lpft", "probe")
    plain, random_first = start_of(data, tmp_path / "plain", "random")
    l2 = lpft["probe"]["l2_absolute"]
    assert head_gradient(first, data, l2) < 1e-3
    assert head_gradient(random_first, data, l2) > 1e-2
    lora_b = [p for n, p in first.named_parameters() if n.endswith("lora_B")]
    assert lora_b and all(torch.equal(b, torch.zeros_like(b)) for b in lora_b)
    assert all(p.requires_grad for n, p in first.named_parameters() if "lora_" in n)
    assert lpft["trainable_params"] == plain["trainable_params"]
    assert lpft["head_init"] == "probe" and plain["head_init"] == "random"
    assert plain["probe"] is None
    assert "head_init: probe" in (tmp_path / "lpft" / "config.yaml").read_text()
    lines = [json.loads(s) for s in (tmp_path / "lpft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1] and lines[0]["l2"] == lpft["probe"]["l2"]


def test_head_init_is_validated() -> None:
    with pytest.raises(ValueError, match="head_init must be one of random, probe"):
        linear_run(Path("."), Path("x"), head_init="zeros")
