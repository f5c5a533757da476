"""The multi-resolution diffusion loss (REFERENCE.md section 3).

total(b) = sum_r w_r * lambda_r(t_b) * mean_{C,H,W} (convert(pred_r) - target_r)^2

The network output is converted to the loss target through x0 (ml-mdm predicts v and regresses eps).
With mixed-resolution batches only the first fraction m_r of the batch carries level r; its loss is
computed on those rows, divided by m_r (so its expected weight is unchanged) and zero elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from matryoshka import pyramid as pyr
from matryoshka import schedule as sched
from matryoshka.diffusion import DiffusionConfig, PyramidSchedule


@dataclass
class LossOutput:
    total: torch.Tensor  # (B,) per-sample weighted sum over levels
    per_level: list[torch.Tensor]  # R tensors (B,), unweighted mean squared error per level (0 on absent rows)

    def mean(self) -> torch.Tensor:
        return self.total.mean()


def rows_per_level(batch_size: int, mixed_ratio: list[float] | None, num_levels: int) -> list[int]:
    """How many leading rows of the batch carry each level (highest first)."""
    if mixed_ratio is None:
        return [batch_size] * num_levels
    return [max(1, int(r * batch_size)) for r in mixed_ratio]


def snr_weight(gamma: torch.Tensor, target: str, min_snr_gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weighting (Hang et al. 2023), expressed for the given regression target."""
    snr = gamma / (1 - gamma)
    clipped = snr.clamp(max=min_snr_gamma)
    if target == "eps":
        return clipped / snr
    if target == "v":
        return clipped / (snr + 1)
    return clipped


def multi_resolution_loss(
    predictions: list[torch.Tensor],
    clean: list[torch.Tensor],
    noise: list[torch.Tensor],
    noisy: list[torch.Tensor],
    t: torch.Tensor,
    schedule: PyramidSchedule,
    config: DiffusionConfig,
    level_weights: list[float] | None = None,
) -> LossOutput:
    """Loss of one batch.

    predictions, noisy: R tensors; level r has rows_per_level(...)[r] rows (the leading part of the batch).
    clean, noise: R tensors with the full batch (B, ...), the *scaled* signal that was noised.
    t: (B,) int64 training times; the noise level of time t is gamma[t + 1].
    level_weights: overrides config.level_weights (e.g. a progressive stage's weights).
    """
    batch = clean[-1].shape[0]
    weights = level_weights if level_weights is not None else config.level_weights
    weights = weights if weights is not None else [1.0] * len(predictions)
    ratios = config.mixed_ratio or [1.0] * len(predictions)
    gammas = schedule.at(t + 1, dtype=clean[0].dtype)
    total = clean[0].new_zeros(batch)
    per_level = []
    for r, pred in enumerate(predictions):
        rows = pred.shape[0]
        g = gammas[r][:rows]
        estimate = pyr.convert(noisy[r], pred, g, config.prediction, config.loss_target)
        wanted = pyr.target(clean[r][:rows], noise[r][:rows], g, config.loss_target)
        error = (estimate - wanted).float().pow(2).flatten(1).mean(1)
        if config.loss_weighting == "min_snr":
            error = error * snr_weight(g.float(), config.loss_target, config.min_snr_gamma)
        elif config.loss_weighting == "vdm" and schedule.base is not None:
            error = error * sched.vdm_loss_weights(schedule.base).to(error)[t[:rows] + 1]
        if rows < batch:
            error = torch.cat([error / ratios[r], error.new_zeros(batch - rows)])
        per_level.append(error)
        total = total + weights[r] * error
    return LossOutput(total, per_level)
