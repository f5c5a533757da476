"""The multi-resolution diffusion loss (REFERENCE.md sections 3 and 4b).

total(b) = sum_r w_r * weight_r(t_b) * mean_{C,H,W} (convert(pred_r) - target_r)^2

The network output is converted to the loss target through x0 (ml-mdm predicts v and regresses eps).
With mixed-resolution batches only the first fraction m_r of the batch carries level r; its loss is
computed on those rows, divided by m_r (so its expected weight is unchanged) and zero elsewhere.

Weightings are functions of a level's own (shifted) log-SNR lambda, defined in the eps frame
(L = w_eps(lambda) * MSE_eps) and carried to the loss target's frame by the factor c with
MSE_eps = c * MSE_target: c = 1 (eps), g (v), SNR (x0), (1 - t)^2 (flow velocity; eps - eps_hat =
(1 - t) (u - u_hat)). With SNR = exp(lambda):
    min_snr       w_eps = min(SNR, gamma) / SNR                   (Hang et al. 2023)
    soft_min_snr  w_eps = gamma / (SNR + gamma)                   (Crowson et al. 2024: k-diffusion's
                  (sigma sigma_d)^2 / (sigma^2 + sigma_d^2)^2 on its preconditioned target, sigma^2 =
                  1 / SNR, which is this with gamma = 1 / sigma_d^2)
    sigmoid       w_eps = sigmoid(b - lambda)                     (Kingma & Gao 2023; bias b)
    vdm           ml-mdm's discrete ELBO weights of the base schedule, on the target's own MSE
    none          plain MSE on the target (no factor)
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


def eps_frame_factor(gamma: torch.Tensor, target: str) -> torch.Tensor:
    """c with MSE_eps = c * MSE_target at alpha-bar gamma (B,), for converting eps-frame weights."""
    if target == "eps":
        return torch.ones_like(gamma)
    if target == "v":
        return gamma
    if target == "x0":
        return gamma / (1 - gamma)
    if target == "flow":
        a, b = gamma.sqrt(), (1 - gamma).sqrt()
        return (a / (a + b)) ** 2
    raise ValueError(f"unknown loss target {target!r}")


def eps_frame_weight(gamma: torch.Tensor, weighting: str, min_snr_gamma: float = 5.0, sigmoid_bias: float = 2.0):
    """w_eps of the named weighting at alpha-bar gamma (B,) (see the module docstring)."""
    snr = gamma / (1 - gamma)
    if weighting == "min_snr":
        return (min_snr_gamma / snr).clamp(max=1)  # min(SNR, gamma) / SNR, finite at SNR = 0
    if weighting == "soft_min_snr":
        return min_snr_gamma / (snr + min_snr_gamma)
    if weighting == "sigmoid":
        return torch.sigmoid(sigmoid_bias - sched.log_snr(gamma))
    raise ValueError(f"unknown loss weighting {weighting!r}")


def level_weight(gamma: torch.Tensor, t: torch.Tensor, level: int, schedule: PyramidSchedule, config: DiffusionConfig):
    """The per-sample loss weight of level `level` at alpha-bar gamma (B,) and times t (B,); None = 1."""
    weighting = config.weighting_of(level)
    if weighting == "none":
        return None
    if weighting == "vdm":
        return None if schedule.base is None else sched.vdm_loss_weights(schedule.base).to(gamma)[t + 1]
    w = eps_frame_weight(gamma, weighting, config.min_snr_gamma, config.sigmoid_bias_of(level))
    return w * eps_frame_factor(gamma, config.loss_target)


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
    gammas_f64 = schedule.at(t + 1, dtype=torch.float64)  # weights near SNR 0 or 1e4 need the precision
    total = clean[0].new_zeros(batch)
    per_level = []
    for r, pred in enumerate(predictions):
        rows = pred.shape[0]
        g = gammas[r][:rows]
        estimate = pyr.convert(noisy[r], pred, g, config.prediction, config.loss_target)
        wanted = pyr.target(clean[r][:rows], noise[r][:rows], g, config.loss_target)
        error = (estimate - wanted).float().pow(2).flatten(1).mean(1)
        weight = level_weight(gammas_f64[r][:rows], t[:rows], r, schedule, config)
        if weight is not None:
            error = error * weight.float()
        if rows < batch:
            error = torch.cat([error / ratios[r], error.new_zeros(batch - rows)])
        per_level.append(error)
        total = total + weights[r] * error
    return LossOutput(total, per_level)
