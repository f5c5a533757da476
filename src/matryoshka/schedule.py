"""Noise schedules: base alpha-bar tables, the per-resolution SNR shift, and time-step spacing.

Notation (REFERENCE.md section 2): `gamma[t]` is alpha-bar at discrete time t, over T + 1 entries,
where index 0 means "clean" (gamma = 1) and index T is the noisiest step. The signal-to-noise ratio
is SNR = gamma / (1 - gamma). A level whose side is `scale` times the base side sees
SNR' = SNR / scale**power (Simple Diffusion / MDM's shifted schedule).

Everything here is a pure function of its arguments: no module state, no I/O.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SCHEDULES = ("squaredcos_cap_v2", "cosine_logsnr", "linear", "rectified_flow")


def squaredcos_cap_v2(num_steps: int) -> torch.Tensor:
    """Improved-DDPM cosine schedule ("DEEPFLOYD" in ml-mdm) as alpha-bar, shape (T + 1,), float64.

    beta_i = min(1 - abar((i + 1) / T) / abar(i / T), 0.999), gamma = cumprod(1 - beta), gamma[0] = 1.
    """

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999) for i in range(num_steps)]
    return _gammas_from_betas(np.asarray(betas))


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear betas as alpha-bar, shape (T + 1,), float64."""
    return _gammas_from_betas(np.linspace(beta_start, beta_end, num=num_steps))


def cosine_logsnr(num_steps: int, logsnr_min: float = -5.0, logsnr_max: float = 5.0) -> torch.Tensor:
    """Cosine schedule in log-SNR (progressive distillation), clipped to [logsnr_min, logsnr_max].

    As in ml-mdm, the T entries sample u = linspace(0, 1, T) (both ends included) and gamma[0] = 1
    is prepended, so gamma[1] already has logSNR = logsnr_max. Shape (T + 1,), float64.
    """
    u = np.linspace(0.0, 1.0, num=num_steps)
    b = np.arctan(np.exp(-0.5 * logsnr_max))
    a = np.arctan(np.exp(-0.5 * logsnr_min)) - b
    logsnr = -2.0 * np.log(np.tan(a * u + b))
    gammas = 1.0 / (1.0 + np.exp(-logsnr))
    return torch.from_numpy(np.concatenate(([1.0], gammas)))


def rectified_flow(num_steps: int) -> torch.Tensor:
    """The flow-matching path x_t = (1 - t) x0 + t eps at t = i / T as alpha-bar, shape (T + 1,), float64.

    In variance-preserving terms that state is (1 - t) x0 + t eps = n(t) (sqrt(g) x0 + sqrt(1 - g) eps)
    with g = (1 - t)^2 / ((1 - t)^2 + t^2), i.e. SNR(t) = ((1 - t) / t)^2 (REFERENCE.md section 4b). The
    last entry (t = 1, pure noise) is floored at 1e-8 so that log-SNR and SNR weights stay finite.
    """
    t = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    gammas = (1 - t) ** 2 / ((1 - t) ** 2 + t**2)
    return torch.from_numpy(np.maximum(gammas, 1e-8))


def flow_time(gamma: torch.Tensor) -> torch.Tensor:
    """The flow time t in [0, 1] of alpha-bar g: t = sqrt(1 - g) / (sqrt(g) + sqrt(1 - g)).

    A shifted level's t is the MDM/SD3 time map of the base t (REFERENCE.md section 4b)."""
    a, b = gamma.sqrt(), (1 - gamma).sqrt()
    return b / (a + b)


def _gammas_from_betas(betas: np.ndarray) -> torch.Tensor:
    # cumsum of logs, as the reference does, so that tables agree to the last bit.
    log_alphas = np.log(1.0 - np.concatenate(([0.0], betas)))
    return torch.from_numpy(np.exp(np.cumsum(log_alphas)))


def base_gammas(
    name: str,
    num_steps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    logsnr_min: float = -5.0,
    logsnr_max: float = 5.0,
) -> torch.Tensor:
    """The unshifted alpha-bar table of the named schedule, shape (T + 1,), float64."""
    if name == "squaredcos_cap_v2":
        return squaredcos_cap_v2(num_steps)
    if name == "linear":
        return linear_betas(num_steps, beta_start, beta_end)
    if name == "cosine_logsnr":
        return cosine_logsnr(num_steps, logsnr_min, logsnr_max)
    if name == "rectified_flow":
        return rectified_flow(num_steps)
    raise ValueError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def shift(gamma: torch.Tensor, scale: float, power: float = 1.0) -> torch.Tensor:
    """Shift alpha-bar so that SNR' = SNR / scale**power (any shape, any float dtype).

    gamma' = gamma / (gamma + scale**p * (1 - gamma)), which is 1 / (1 + scale**p (1 - gamma) / gamma)
    written so that gamma = 1 stays exactly 1 and gamma = 0 stays 0. scale = 1 (the base level) leaves
    gamma as it is; scale < 1 raises the SNR (e.g. `base_snr_scale: 0.5` anchors a 2-level model's
    schedule at its top level, which then gets the unshifted schedule).
    """
    if scale == 1:
        return gamma
    factor = float(scale) ** float(power)
    return gamma / (gamma + factor * (1 - gamma))


def log_snr(gamma: torch.Tensor) -> torch.Tensor:
    """log(gamma / (1 - gamma)), elementwise."""
    return torch.log(gamma) - torch.log1p(-gamma)


def gamma_from_log_snr(logsnr: torch.Tensor) -> torch.Tensor:
    """Inverse of `log_snr`: sigmoid(logsnr)."""
    return torch.sigmoid(logsnr)


def interpolate_log_snr(gammas: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Continuous-time log-SNR: linear interpolation of log-SNR between the discrete entries.

    gammas: (T + 1,) alpha-bar table; t: any shape, continuous index in [0, T] (0 = clean).
    Returns log-SNR of the same shape as t. Index 0 (gamma = 1, log-SNR = +inf) is clamped to a large
    finite value (and a pure-noise end, gamma = 0, to a very negative one) so that interpolation stays finite.
    """
    table = log_snr(gammas.double()).clamp(min=-30.0, max=30.0)
    num_steps = gammas.numel() - 1
    t = t.double().clamp(0, num_steps)
    lower = t.floor().long().clamp(max=num_steps - 1)
    frac = t - lower
    return (table[lower] * (1 - frac) + table[lower + 1] * frac).to(torch.float64)


def spaced_timesteps(num_train_steps: int, num_inference_steps: int) -> torch.Tensor:
    """ml-mdm's sampling time steps: round(arange(K + 1) * (T + 1) / (K + 1)), descending, int64.

    K = 50, T = 1000 gives [981, 961, ..., 20, 0]: K + 1 entries, K transitions (t -> s), the last s = 0.
    numpy's round-half-to-even is used on purpose: it is what the reference does.
    """
    if num_inference_steps < 1 or num_inference_steps > num_train_steps:
        raise ValueError(f"num_inference_steps must be in [1, {num_train_steps}], got {num_inference_steps}")
    ratio = (num_train_steps + 1) / (num_inference_steps + 1)
    steps = (np.arange(0, num_inference_steps + 1) * ratio).round()[::-1].astype(np.int64)
    return torch.from_numpy(steps.copy())


def vdm_loss_weights(gammas: torch.Tensor) -> torch.Tensor:
    """ml-mdm's VDM-style per-step weights, indexed like gammas (shape (T + 1,)).

    w[t] = SNR(t - 1) / SNR(t) - 1 (the discrete-time ELBO weight of step t), with the first two
    entries copied from the first defined one.
    """
    g, g_last = gammas[2:], gammas[1:-1]
    weights = g_last * (1 - g) / (1 - g_last) / g - 1
    return torch.cat([weights[:1], weights[:1], weights])
