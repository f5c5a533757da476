"""channels_last for models that also hold video layers.

torch defines channels_last for rank-4 tensors only, and `Module.to(memory_format=torch.channels_last)`
fails on the 5-D weights of a video model's temporal convolutions. These helpers change the layout of
the rank-4 tensors (the 2-D convolutions' weights, image batches) and leave every other tensor as it is,
so image and video models take the same `channels_last` option.
"""

from __future__ import annotations

import torch


def with_memory_format(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """x in `memory_format` if it is a rank-4 tensor (B, C, H, W); any other tensor as it is."""
    if memory_format is torch.preserve_format or x.dim() != 4:
        return x
    return x.contiguous(memory_format=memory_format)


@torch.no_grad()
def set_memory_format(module: torch.nn.Module, memory_format: torch.memory_format) -> torch.nn.Module:
    """Store the rank-4 parameters and buffers of `module` in `memory_format` (in place); returns it."""
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor.data = with_memory_format(tensor.data, memory_format)
    return module
