"""The text-encoder interface: `TextEmbedding` (what an encoder returns) and `TextEncoder`.

Every encoder returns per-token states already multiplied by the attention mask (zeros at padding),
the mask itself, and the masked mean of the states as the pooled vector. This is the convention of the
official MDM code (`lm_outputs * lm_mask`), where the UNet adds Linear(pooled) to its time embedding and
cross-attends to the states.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def masked_mean(states: Tensor, mask: Tensor) -> Tensor:
    """Mean of `states` (B, L, D) over the positions where `mask` (B, L) is 1; returns (B, D).

    A row with no real token gives zeros (the denominator is clamped to 1) instead of NaN.
    """
    weights = mask.to(states.dtype).unsqueeze(-1)
    total = (states * weights).sum(dim=1)
    count = weights.sum(dim=1).clamp(min=1.0)
    return total / count


@dataclass(frozen=True)
class TextEmbedding:
    """A batch of encoded prompts.

    Attributes:
        states: (B, L, D) float, per-token last hidden states, zero at padding positions.
        mask: (B, L) long, 1 at real tokens and 0 at padding; real tokens come first in each row.
        pooled: (B, D) float, masked mean of the states over the real tokens.
    """

    states: Tensor
    mask: Tensor
    pooled: Tensor

    def __post_init__(self) -> None:
        if self.states.ndim != 3:
            raise ValueError(f"TextEmbedding.states must be (B, L, D); got shape {tuple(self.states.shape)}")
        batch, length, dim = self.states.shape
        if tuple(self.mask.shape) != (batch, length):
            raise ValueError(
                f"TextEmbedding.mask must be (B, L) = {(batch, length)} to match states; "
                f"got {tuple(self.mask.shape)}"
            )
        if tuple(self.pooled.shape) != (batch, dim):
            raise ValueError(
                f"TextEmbedding.pooled must be (B, D) = {(batch, dim)} to match states; "
                f"got {tuple(self.pooled.shape)}"
            )
        if self.mask.is_floating_point() or self.mask.is_complex():
            raise ValueError(f"TextEmbedding.mask must be an integer or bool tensor; got {self.mask.dtype}")

    def __len__(self) -> int:
        return self.states.shape[0]

    @property
    def batch_size(self) -> int:
        return self.states.shape[0]

    @property
    def length(self) -> int:
        """L, the padded token length of the batch."""
        return self.states.shape[1]

    @property
    def dim(self) -> int:
        return self.states.shape[2]

    @property
    def lengths(self) -> Tensor:
        """(B,) long, the number of real tokens of each row."""
        return self.mask.long().sum(dim=1)

    @property
    def device(self) -> torch.device:
        return self.states.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEmbedding:
        """Moves every tensor to `device`; casts the float tensors (states, pooled) to `dtype`."""
        return TextEmbedding(
            states=self.states.to(device=device, dtype=dtype),
            mask=self.mask.to(device=device),
            pooled=self.pooled.to(device=device, dtype=dtype),
        )

    def __getitem__(self, rows: int | slice | Sequence[int] | Tensor) -> TextEmbedding:
        """Selects rows of the batch; an integer index keeps the batch dimension (B = 1)."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1) if rows != -1 else slice(-1, None)
        return TextEmbedding(states=self.states[rows], mask=self.mask[rows], pooled=self.pooled[rows])

    def repeat(self, times: int) -> TextEmbedding:
        """Tiles the whole batch `times` times along B: rows [0..B-1, 0..B-1, ...]."""
        if times < 1:
            raise ValueError(f"repeat needs times >= 1; got {times}")
        return TextEmbedding(
            states=self.states.repeat(times, 1, 1),
            mask=self.mask.repeat(times, 1),
            pooled=self.pooled.repeat(times, 1),
        )


class TextEncoder(ABC):
    """A frozen text encoder: prompts in, `TextEmbedding` out.

    Implementations keep their network in eval mode with gradients off and run it under
    `torch.no_grad()` (not `inference_mode`: its tensors could not be saved for backward by the
    trainable layers that consume the states).

    Attributes:
        name: identifies the encoder's weights and tokenization (cache keys use it), e.g. "minilm".
        dim: D, the width of the states and the pooled vector.
        max_length: the most tokens a prompt keeps, special tokens included.
    """

    name: str
    dim: int
    max_length: int

    @abstractmethod
    def encode(self, prompts: list[str]) -> TextEmbedding:
        """Encodes B prompts into states (B, L, D), mask (B, L) and pooled (B, D) on `self.device`."""

    @abstractmethod
    def to(self, device: torch.device | str) -> TextEncoder:
        """Moves the encoder to `device` in place and returns it."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where `encode` puts its outputs."""

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """A plain (YAML/JSON-serialisable) dict from which `load_text_encoder` rebuilds this encoder."""

    def __call__(self, prompts: list[str]) -> TextEmbedding:
        return self.encode(prompts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, max_length={self.max_length})"


def check_prompts(prompts: object) -> list[str]:
    """Returns `prompts` as a list of str, or raises naming what is wrong with it."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string; wrap it: [prompt]")
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings; got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: encode needs at least one prompt")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{index}] must be a str; got {type(prompt).__name__}")
    return prompts
