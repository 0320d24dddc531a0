"""Evaluation runs mergeable methods merged (a copy) and gives the same predictions."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import tiny_model
from torch.utils.data import DataLoader, TensorDataset

import vpeft
from vpeft.engine.evaluate import deployed, evaluate
from vpeft.engine.runtime import make_accelerator


@pytest.mark.parametrize("method", ["ssf", "lora", "vpt-shallow"])
def test_merged_evaluation_gives_the_same_predictions(method):
    model = vpeft.adapt(tiny_model(), method)
    with torch.no_grad():  # a trained-looking adapter: every added tensor away from its init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p), alpha=0.05)
    g = torch.Generator().manual_seed(0)
    classes = model(torch.zeros(1, 3, 32, 32)).shape[-1]
    data = TensorDataset(torch.randn(24, 3, 32, 32, generator=g),
                         torch.randint(0, classes, (24,), generator=g))
    acc = make_accelerator("no", cpu=True)
    loader = acc.prepare(DataLoader(data, batch_size=8))
    merged = evaluate(model, loader, acc, show_progress=False)
    adapted = evaluate(model, loader, acc, show_progress=False, merge=False)
    assert torch.equal(merged.predictions, adapted.predictions)
    assert merged.top1 == adapted.top1
    assert merged.loss == pytest.approx(adapted.loss, rel=1e-5)
    state = vpeft.get_state(model)
    assert (state.merged is None and vpeft.get_state(deployed(model)).merged is not None) \
        or not state.method.mergeable  # the adapted model is left as it is
    assert (deployed(model) is model) == (not state.method.mergeable)
