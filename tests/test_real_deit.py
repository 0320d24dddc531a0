"""Every method on the real pretrained DeiT-Tiny (from ../shared/weights)."""

from __future__ import annotations

import pytest
import torch

import vpeft

from conftest import FOUNDATION, real_deit


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 224, 224, generator=g), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("method", FOUNDATION)
def test_method_runs_on_real_deit(method: str, batch):
    model = vpeft.adapt(real_deit(), method)
    x, y = batch
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


@pytest.mark.parametrize("method", ["lora", "ssf", "bitfit"])
def test_merge_on_real_deit(method: str, batch):
    model = vpeft.adapt(real_deit(), method).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "head" not in n:
                p.add_(0.01 * torch.randn_like(p))
        ref = model(batch[0])
        out = vpeft.merge(model)(batch[0])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_loading_a_checkpoint_for_another_config_fails(tmp_path):
    vpeft.save(vpeft.adapt(real_deit(), "lora", rank=4), tmp_path)
    with pytest.raises(vpeft.CheckpointError, match="rank"):
        vpeft.load(vpeft.adapt(real_deit(), "lora", rank=8), tmp_path)
    import timm

    other = timm.create_model("vit_tiny_patch16_224", num_classes=10)
    with pytest.raises(vpeft.CheckpointError, match="made for deit_tiny_patch16_224"):
        vpeft.load(other, tmp_path)
