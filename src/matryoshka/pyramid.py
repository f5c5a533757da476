"""The pyramid of one sample and the forward process on it.

A pyramid is a list of tensors, one per level, highest resolution first: images (B, C, H, W) or
videos (B, C, T, H, W). Level r is the level above it down-sampled by an integer factor in space
(average pooling) and, for video, in time (every k-th frame, as ml-mdm does).

Conversions between the parameterisations, for alpha-bar g (REFERENCE.md sections 3 and 4b):
    x_t = sqrt(g) x0 + sqrt(1 - g) eps
    v   = sqrt(g) eps - sqrt(1 - g) x0
    x0  = sqrt(g) x_t - sqrt(1 - g) v          eps = sqrt(1 - g) x_t + sqrt(g) v
    x0  = (x_t - sqrt(1 - g) eps) / sqrt(g)     eps = (x_t - sqrt(g) x0) / sqrt(1 - g)
    "flow" (flow matching): the network sees the flow state x_f = (1 - t) x0 + t eps = x_t / (sqrt(g) +
    sqrt(1 - g)), t = sqrt(1 - g) / (sqrt(g) + sqrt(1 - g)), and predicts the velocity u = eps - x0;
    x0 = x_f - t u. Samplers keep the variance-preserving x_t; `model_input` hands the network its view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Pyramid = list[torch.Tensor]


def _expand(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against `like`; scalars pass through."""
    if g.ndim == 0:
        return g
    return g.reshape(g.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


def downsample(x: torch.Tensor, space: int, time: int = 1) -> torch.Tensor:
    """Average-pool space by `space`; keep every `time`-th frame of a video (B, C, T, H, W)."""
    if x.ndim == 5:
        if time > 1:
            x = x[:, :, ::time]
        if space > 1:
            b, c, t, h, w = x.shape
            frames = x.transpose(1, 2).reshape(b * t, c, h, w)
            frames = F.avg_pool2d(frames, space)
            x = frames.reshape(b, t, c, h // space, w // space).transpose(1, 2)
        return x
    if time != 1:
        raise ValueError("temporal down-sampling needs a video tensor (B, C, T, H, W)")
    return F.avg_pool2d(x, space) if space > 1 else x


def build_pyramid(x: torch.Tensor, scales: list[int], time_scales: list[int] | None = None) -> Pyramid:
    """Clean top level -> pyramid, highest first.

    scales: side of each level over the base side, highest first (e.g. [16, 4, 1] for 1024/256/64);
    each level is pooled from the one above it by scales[i - 1] // scales[i].
    time_scales: the same for the number of frames (video only); None = no temporal nesting.
    """
    _check_scales(scales)
    time_scales = time_scales or [1] * len(scales)
    levels = [x]
    for i in range(1, len(scales)):
        levels.append(
            downsample(levels[-1], scales[i - 1] // scales[i], time_scales[i - 1] // time_scales[i])
        )
    return levels


def _check_scales(scales: list[int]) -> None:
    for i in range(1, len(scales)):
        if scales[i - 1] % scales[i] != 0:
            raise ValueError(f"level scales must divide each other, got {scales}")


def level_shapes(top_shape: tuple[int, ...], scales: list[int], time_scales: list[int] | None = None):
    """Shapes of every level, highest first, for a top-level sample shape (C, H, W) or (C, T, H, W)."""
    time_scales = time_scales or [1] * len(scales)
    shapes = []
    for s, ts in zip(scales, time_scales, strict=True):
        factor, tfactor = scales[0] // s, time_scales[0] // ts
        if len(top_shape) == 4:
            c, t, h, w = top_shape
            shapes.append((c, t // tfactor, h // factor, w // factor))
        else:
            c, h, w = top_shape
            shapes.append((c, h // factor, w // factor))
    return shapes


def sample_noise(pyramid: Pyramid, generator: torch.Generator | None = None) -> Pyramid:
    """Independent N(0, I) noise for every level (not pooled noise: REFERENCE.md section 3)."""
    return [
        torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) for x in pyramid
    ]


def add_noise(x0: torch.Tensor, eps: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(g) x0 + sqrt(1 - g) eps; gamma (B,) or scalar."""
    g = _expand(gamma, x0)
    return g.sqrt() * x0 + (1 - g).sqrt() * eps


def _flow_view(x_t: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the flow state x_f, the flow time t) of the variance-preserving state x_t at alpha-bar g."""
    a, b = g.sqrt(), (1 - g).sqrt()
    return x_t / (a + b), b / (a + b)


def model_input(x_t: torch.Tensor, gamma: torch.Tensor, kind: str) -> torch.Tensor:
    """What a network of prediction kind `kind` is given for the state x_t: x_t itself, or for "flow"
    the flow state (1 - t) x0 + t eps."""
    if kind != "flow":
        return x_t
    return _flow_view(x_t, _expand(gamma, x_t))[0]


def to_x0(x_t: torch.Tensor, prediction: torch.Tensor, gamma: torch.Tensor, kind: str) -> torch.Tensor:
    """The clean estimate implied by a network output of the given kind ("v", "eps", "x0" or "flow")."""
    g = _expand(gamma, x_t)
    if kind == "flow":
        x_flow, t = _flow_view(x_t, g)
        return x_flow - t * prediction
    if kind == "v":
        return g.sqrt() * x_t - (1 - g).sqrt() * prediction
    if kind == "eps":
        return (x_t - (1 - g).sqrt() * prediction) / g.sqrt()
    if kind == "x0":
        return prediction
    raise ValueError(f"unknown prediction kind {kind!r}")


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """eps = (x_t - sqrt(g) x0) / sqrt(1 - g)."""
    g = _expand(gamma, x_t)
    return (x_t - g.sqrt() * x0) / (1 - g).sqrt()


def from_x0(x_t: torch.Tensor, x0: torch.Tensor, gamma: torch.Tensor, kind: str) -> torch.Tensor:
    """Express the clean estimate x0 at noisy point x_t as a prediction of the given kind."""
    g = _expand(gamma, x_t)
    if kind == "x0":
        return x0
    if kind == "eps":
        return eps_from_x0(x_t, x0, gamma)
    if kind == "flow":
        x_flow, t = _flow_view(x_t, g)
        return (x_flow - x0) / t
    if kind == "v":
        return (g.sqrt() * x_t - x0) / (1 - g).sqrt()
    raise ValueError(f"unknown prediction kind {kind!r}")


def target(x0: torch.Tensor, eps: torch.Tensor, gamma: torch.Tensor, kind: str) -> torch.Tensor:
    """The regression target of the given kind for clean x0 and noise eps."""
    g = _expand(gamma, x0)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return g.sqrt() * eps - (1 - g).sqrt() * x0
    if kind == "flow":
        return eps - x0
    raise ValueError(f"unknown target kind {kind!r}")


def convert(x_t: torch.Tensor, prediction: torch.Tensor, gamma: torch.Tensor, source: str, dest: str):
    """Re-express a network output of kind `source` as kind `dest` (through x0, as ml-mdm does)."""
    if source == dest:
        return prediction
    return from_x0(x_t, to_x0(x_t, prediction, gamma, source), gamma, dest)
