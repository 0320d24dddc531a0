"""FLOP counts by PyTorch's own counter: a forward per image, and a whole training step.

The training step's count is what makes a step ratio interpretable: a method whose step needs
1.4x the floor's FLOPs cannot run at 1.1x the floor's time on a compute-bound device, whatever
its kernels do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count


def flops_per_image(model: nn.Module, img_size: int) -> float:
    """Forward FLOPs for one image, by PyTorch's own FLOP counter."""
    p = next(model.parameters())
    x = torch.zeros(1, 3, img_size, img_size, device=p.device, dtype=p.dtype)
    counter = FlopCounterMode(display=False)
    # frozen for the count: under no_grad a view of a trainable tensor (an expanded prompt) still
    # says requires_grad, and the counter's module tracker fails on it
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)
    try:
        with torch.no_grad(), counter:
            model.eval()(x)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return float(counter.get_total_flops())


def _conv_backward_flops(grad_out_shape: Any, x_shape: Any, w_shape: Any, _bias: Any,
                         _stride: Any, _padding: Any, _dilation: Any, transposed: bool,
                         _output_padding: Any, _groups: Any, output_mask: Any, out_shape: Any,
                         **kwargs: Any) -> int:
    """A convolution's backward: each gradient asked for (input, weight) costs the forward's
    products once more. PyTorch's own formula counts the weight gradient of a grouped
    convolution ``groups`` times over (a depthwise 7 x 7 conv's by its channel count), which
    would make methods that train through depthwise convs (Mona, ConvNeXt) look far costlier
    than they are."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def step_flops(step: Callable[[], None]) -> float:
    """FLOPs of one call of a training ``step`` (forward, backward and, for ``train_step``, the
    optimiser's update, which counts none) by PyTorch's FLOP counter: every matmul, conv and
    attention product autograd runs, including those inside custom autograd functions. A
    method's ratio to the floor's is the step ratio a compute-bound device would show."""
    counter = FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})
    with counter:
        step()
    return float(counter.get_total_flops())
