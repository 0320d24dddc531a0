"""The default way a head on cached features trains: fitted to convergence, its L2 chosen by CV.

With the backbone frozen and its features cached (see :mod:`vpeft.engine.features`), training the
head is multinomial logistic regression: a convex problem, solved here full batch with L-BFGS
instead of a few epochs of AdamW that stop far from the optimum. This is the standard linear-probe
protocol (CLIP, Radford et al. 2021, appendix A.3: L-BFGS logistic regression, the L2 strength
swept on held-out data on a log grid).

The objective is ``mean cross-entropy + l2 * s / 2 * ||W||^2`` over the head's weight matrices
(biases are not penalised, as in scikit-learn), where ``s`` is the mean squared feature value: the
curvature of the loss grows with ``s``, so with it the grid means the same on any backbone's
feature scale. ``l2`` is chosen from :data:`L2_GRID` by stratified k-fold cross-validation on the
*training* features only (ties go to the stronger penalty), then the head is refitted on all of
them. The evaluation split is never read here: on ``train800 -> val200`` that keeps ``val200`` a
clean score for a search, and on ``train800val200 -> test`` it keeps test untouched.

Everything is deterministic given the seed (it only draws the folds), and every process of a
multi-process run computes the same fit from the same gathered features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: Relative L2 strengths tried, strongest first (warm starts go from simple to complex fits).
L2_GRID: tuple[float, ...] = tuple(10.0**e for e in range(1, -6, -1))  # 1e1 .. 1e-5
FOLDS = 5
MAX_ITER = 1000  # the final fit (CLIP's probes use 1000 too)
CV_MAX_ITER = 300  # each warm-started fit of the search


@dataclass
class ProbeResult:
    """What the probe chose and reached; written into the run's metrics and results."""

    l2: float  # chosen relative strength (see the module docstring)
    l2_absolute: float  # l2 * s: the coefficient actually used on ||W||^2 / 2
    iterations: int  # L-BFGS iterations of the final fit
    train_loss: float  # mean cross-entropy on the training features at the end
    train_top1: float
    cv_top1: dict[str, float]  # mean cross-validated top-1 (%) per grid value
    folds: int
    images: int
    solver: str = "lbfgs"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def record(self) -> dict[str, object]:
        """The run's one ``metrics.jsonl`` line (the keys of an epoch's line, plus the probe's)."""
        return {"epoch": 0, "loss": self.train_loss, "train_top1": self.train_top1, "lr": None,
                "seconds": None, "images": self.images, "l2": self.l2,
                "iterations": self.iterations}


def stratified_folds(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """A fold index in ``[0, k)`` per sample: each class spread evenly over the folds, in an
    order drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    folds = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique():
        members = order[labels[order] == c]
        folds[members] = torch.arange(len(members)) % k
    # rotate where each class starts so that small classes do not all land in fold 0
    shift = torch.randint(k, (int(labels.max()) + 1,), generator=gen)
    return (folds + shift[labels]) % k


class _Fitter:
    """Fits ``net``'s trainable parameters on ``(x, y)`` for a given L2 strength."""

    def __init__(self, net: nn.Module, scale: float) -> None:
        self.net, self.scale = net, scale
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.penalised = [p for p in self.params if p.ndim >= 2]  # weights, not biases

    def state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def load(self, state: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, state):
                p.copy_(s)

    def fit(self, x: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int) -> int:
        """Minimise the penalised loss from the current parameters; the iterations taken."""
        opt = torch.optim.LBFGS(self.params, lr=1.0, max_iter=max_iter, history_size=20,
                                tolerance_grad=1e-6, tolerance_change=1e-9,
                                line_search_fn="strong_wolfe")
        coef = l2 * self.scale / 2

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.net(x).float(), y)
            loss = loss + coef * sum(p.float().pow(2).sum() for p in self.penalised)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return int(opt.state[self.params[0]].get("n_iter", 0))

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(mean cross-entropy, top-1 %) on ``(x, y)``."""
        logits = self.net(x).float()
        top1 = 100.0 * (logits.argmax(-1) == y).float().mean().item()
        return F.cross_entropy(logits, y).item(), top1


def fit_probe(net: nn.Module, feats: torch.Tensor, labels: torch.Tensor, seed: int,
              device: torch.device | str = "cpu", grid: tuple[float, ...] = L2_GRID,
              folds: int = FOLDS, max_iter: int = MAX_ITER,
              cv_max_iter: int = CV_MAX_ITER) -> ProbeResult:
    """Fit ``net``'s trainable parameters (the head) in place on cached training features.

    ``net`` maps ``feats`` to logits (a :class:`~vpeft.engine.features.CachedHead`). ``l2`` is
    chosen by ``folds``-fold cross-validation over ``grid`` on these features alone, then the
    head is refitted on all of them with it.
    """
    if not grid or folds < 2:
        raise ValueError("the probe needs a non-empty L2 grid and at least 2 folds")
    x, y = feats.to(device), labels.to(device)
    scale = x.float().pow(2).mean().item() or 1.0
    fitter = _Fitter(net, scale)
    start = fitter.state()
    was_training = net.training
    net.eval()  # the cached head has no dropout or batch statistics that should differ
    fold_of = stratified_folds(labels, folds, seed).to(device)
    grid = tuple(sorted(grid, reverse=True))
    correct = torch.zeros(len(grid))
    for k in range(folds):
        train, held = fold_of != k, fold_of == k
        fitter.load(start)
        for i, l2 in enumerate(grid):  # warm start from the previous (stronger) fit
            fitter.fit(x[train], y[train], l2, cv_max_iter)
            correct[i] += fitter.evaluate(x[held], y[held])[1] * held.sum().item() / 100
    cv_top1 = 100.0 * correct / len(y)
    best = int(torch.nonzero(cv_top1 == cv_top1.max())[0])  # first max: strongest penalty
    fitter.load(start)
    iterations = fitter.fit(x, y, grid[best], max_iter)
    loss, top1 = fitter.evaluate(x, y)
    net.train(was_training)
    return ProbeResult(l2=grid[best], l2_absolute=grid[best] * scale, iterations=iterations,
                       train_loss=loss, train_top1=top1,
                       cv_top1={f"{g:.0e}": round(float(a), 2) for g, a in zip(grid, cv_top1)},
                       folds=folds, images=len(y))
