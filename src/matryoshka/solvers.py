"""Continuous-time ODE solvers over a pyramid: DPM-Solver++(2M), Euler and Heun.

All three integrate the probability-flow ODE of every level jointly. The levels share one time grid
t_0 > t_1 > ... > t_K (the `timesteps`, integer or fractional indices in [0, T]) but each level moves
along its own, shifted noise schedule: level r's alpha-bar at continuous time t is
`PyramidSchedule.gammas_at(t)[r]` (log-SNR linear between the discrete entries, so integer t gives
exactly the training table).
t = 0 is the clean end: g = 1 exactly.

Parameterisations (per level, dropping r; x is the variance-preserving state the network sees):
    x = alpha x0 + sigma eps,  alpha = sqrt(g), sigma = sqrt(1 - g),  lambda = log(alpha / sigma)
    Karras et al. (2022) variance-exploding view: y = x / alpha = x0 + s eps,  s = sqrt((1 - g) / g)
The ODE in the VE view is dy/ds = (y - D(y; s)) / s, D = the (thresholded) x0 estimate.

- "euler": one Euler step of that ODE in s. It is algebraically the same update as DDIM(eta = 0)
  (Song et al. 2021, Karras et al. 2022 section 3), so it is the baseline every other solver beats.
- "heun": Karras et al.'s Algorithm 1 without churn: an Euler predictor, a second network call at the
  step's end point, the trapezoidal corrector. Two network calls per step, except the last step to the
  clean end (s = 0 there, where the network is never asked), which is plain Euler.
- "dpmpp_2m": DPM-Solver++(2M) of Lu et al. (2022), the multistep second-order solver in data-prediction
  form, exact in the linear part of the VP ODE:
      h = lambda_s - lambda_t,  x_s = (sigma_s / sigma_t) x_t - alpha_s (exp(-h) - 1) D,
      D = (1 + 1 / 2r) x0_t - (1 / 2r) x0_prev with r = h_prev / h (first step: D = x0_t).
  Each level uses its own alpha_r, sigma_r, lambda_r (the SNR shift offsets a level's log-SNR by a
  constant, so h itself comes out the same for every level, but the coefficients do not). The last
  step to t = 0 is first order (D = x0_t, i.e. x_0 = x0_t): at lambda = +inf the second-order
  extrapolation would divide by r = 0 (common implementations, e.g. diffusers, also lower the order there).

The network receives t - 1 as the discrete sampler does: a LongTensor for integer timesteps, a float
tensor for fractional ones (the time embedding is a sinusoid of a float, so both work).
`run_sampler` dispatches by name to all five methods (ddim, ddpm from `matryoshka.sampling`, and these).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from matryoshka import pyramid as pyr
from matryoshka import sampling
from matryoshka.diffusion import PyramidSchedule

SOLVERS = ("dpmpp_2m", "euler", "heun")
METHODS = (*sampling.SAMPLERS, *SOLVERS)
PREDICTIONS = ("v", "eps", "x0", "flow")

ReplaceLevels = Callable[[list[torch.Tensor], float], list[torch.Tensor]]


def _half_log_snr(gamma: float) -> float:
    """lambda = log(alpha / sigma) = log-SNR / 2 (DPM-Solver's lambda); +inf at the clean end."""
    return math.inf if gamma >= 1 else 0.5 * (math.log(gamma) - math.log1p(-gamma))


def _check_inputs(noise: list[torch.Tensor], schedule: PyramidSchedule, timesteps: torch.Tensor) -> list[float]:
    if len(noise) != schedule.num_levels:
        raise ValueError(f"the noise pyramid has {len(noise)} levels but the schedule has {schedule.num_levels}")
    if timesteps.ndim != 1 or timesteps.numel() < 2:
        raise ValueError(f"timesteps must be a 1-D tensor of at least 2 times, got shape {tuple(timesteps.shape)}")
    steps = [float(t) for t in timesteps.tolist()]
    if any(not b < a for a, b in zip(steps, steps[1:], strict=False)):
        raise ValueError(f"timesteps must be strictly decreasing, got {steps}")
    if steps[-1] < 0 or steps[0] > schedule.num_train_steps:
        raise ValueError(f"timesteps must lie in [0, {schedule.num_train_steps}], got {steps[0]} .. {steps[-1]}")
    return steps


class _DataPredictor:
    """Calls the network on a whole pyramid at time t and returns each level's thresholded x0."""

    def __init__(
        self, denoiser: sampling.Denoiser, schedule: PyramidSchedule, prediction: str, threshold_kind: str,
        integer_times: bool, batch: int, device: torch.device,
    ) -> None:
        self.denoiser, self.schedule = denoiser, schedule
        self.prediction, self.threshold_kind = prediction, threshold_kind
        self.dtype = torch.long if integer_times else torch.float32
        self.batch, self.device = batch, device

    def __call__(self, x_t: list[torch.Tensor], t: float, gammas: list[float]) -> list[torch.Tensor]:
        t_model = torch.full((self.batch,), t - 1, dtype=self.dtype, device=self.device)
        inputs = [
            pyr.model_input(x, torch.tensor(g, dtype=x.dtype, device=x.device), self.prediction)
            for x, g in zip(x_t, gammas, strict=True)
        ]
        predictions = self.denoiser(inputs, t_model)
        if len(predictions) != len(x_t):
            raise ValueError(f"the denoiser returned {len(predictions)} levels for a {len(x_t)}-level pyramid")
        x0s = []
        for level, (x, pred) in enumerate(zip(x_t, predictions, strict=True)):
            g = torch.tensor(gammas[level], dtype=x.dtype, device=x.device)
            x0 = pyr.to_x0(x, pred, g, self.prediction)
            x0s.append(sampling.threshold(x0, self.threshold_kind, self.schedule.signal_scales[level]))
        return x0s


def _euler_ve(x: torch.Tensor, x0: torch.Tensor, g: float, g_s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler step of dy/ds = (y - x0) / s from level g to g_s. Returns (the VP state at g_s, dy/ds)."""
    s_t = math.sqrt((1 - g) / g)
    s_s = math.sqrt((1 - g_s) / g_s)
    y = x / math.sqrt(g)
    slope = (y - x0) / s_t
    return (y + (s_s - s_t) * slope) * math.sqrt(g_s), slope


@torch.no_grad()
def solve(
    denoiser: sampling.Denoiser,
    noise: list[torch.Tensor],
    schedule: PyramidSchedule,
    timesteps: torch.Tensor,
    *,
    method: str = "dpmpp_2m",
    eta: float = 0.0,
    prediction: str = "v",
    threshold_kind: str = "clip",
    generator: torch.Generator | None = None,
    callback: sampling.StepCallback | None = None,
    progress: bool = False,
    replace_levels: ReplaceLevels | None = None,
) -> list[torch.Tensor]:
    """Integrate the probability-flow ODE of the pyramid from timesteps[0] to timesteps[-1].

    denoiser(pyramid, t - 1) -> one prediction per level (of kind `prediction`); noise: the pyramid at
    timesteps[0], highest first, (B, C, H_r, W_r) each; timesteps: strictly decreasing times in [0, T]
    (int64 as `schedule.spaced_timesteps` gives, or float for fractional times).
    method: "dpmpp_2m", "euler" or "heun" (see the module docstring).
    eta, generator: accepted so that every sampler has one signature; these solvers are deterministic,
    so eta must be 0 and the generator is not used.
    replace_levels(pyramid, t): applied to the initial pyramid (at timesteps[0]) and after every step
    (at its end time s); `sampling.condition_on_levels` builds one that pins given low levels.
    Returns the final pyramid, each level multiplied back by its signal scale and clipped to [-1, 1].
    """
    if method not in SOLVERS:
        raise ValueError(f"unknown ODE solver {method!r}; choose one of {', '.join(SOLVERS)}")
    if eta != 0:
        raise ValueError(f"eta = {eta} has no meaning for the deterministic solver {method!r}; use ddim for eta > 0")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction kind {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    steps = _check_inputs(noise, schedule, timesteps)
    x_t = list(noise)
    predict = _DataPredictor(
        denoiser, schedule, prediction, threshold_kind, not timesteps.is_floating_point(), x_t[-1].shape[0],
        x_t[0].device,
    )
    if replace_levels is not None:
        x_t = replace_levels(x_t, steps[0])
    previous: tuple[list[torch.Tensor], list[float]] | None = None  # dpmpp_2m: (x0s, h per level)
    gammas_t = schedule.gammas_at(steps[0])
    for index in tqdm(range(len(steps) - 1), disable=not progress, desc=method, leave=False):
        t, s = steps[index], steps[index + 1]
        gammas_s = schedule.gammas_at(s)
        x0s = predict(x_t, t, gammas_t)
        if method == "dpmpp_2m":
            next_states, steps_h = [], []
            for level, (x, x0) in enumerate(zip(x_t, x0s, strict=True)):
                g, g_s = gammas_t[level], gammas_s[level]
                if g_s >= 1:  # the clean end: the first-order update is x0 itself
                    next_states.append(x0)
                    steps_h.append(math.inf)
                    continue
                h = _half_log_snr(g_s) - _half_log_snr(g)
                data = x0
                if previous is not None:
                    ratio = previous[1][level] / h
                    data = (1 + 0.5 / ratio) * x0 - (0.5 / ratio) * previous[0][level]
                next_states.append(
                    math.sqrt((1 - g_s) / (1 - g)) * x - math.sqrt(g_s) * math.expm1(-h) * data
                )
                steps_h.append(h)
            previous = (x0s, steps_h)
        else:
            euler = [_euler_ve(x, x0, gammas_t[r], gammas_s[r]) for r, (x, x0) in enumerate(zip(x_t, x0s, strict=True))]
            next_states = [state for state, _ in euler]
            if method == "heun" and s > 0:
                x0s_end = predict(next_states, s, gammas_s)
                next_states = []
                for level, (x, (predicted, slope)) in enumerate(zip(x_t, euler, strict=True)):
                    g, g_s = gammas_t[level], gammas_s[level]
                    s_t, s_s = math.sqrt((1 - g) / g), math.sqrt((1 - g_s) / g_s)
                    slope_end = (predicted / math.sqrt(g_s) - x0s_end[level]) / s_s
                    y = x / math.sqrt(g) + (s_s - s_t) * 0.5 * (slope + slope_end)
                    next_states.append(y * math.sqrt(g_s))
        x_t = next_states
        if replace_levels is not None:
            x_t = replace_levels(x_t, s)
        if callback is not None:
            callback(sampling.StepState(index, t, s, x0s, x_t))
        gammas_t = gammas_s
    return [(x * scale).clip(-1, 1) for x, scale in zip(x_t, schedule.signal_scales, strict=True)]


@torch.no_grad()
def run_sampler(
    denoiser: sampling.Denoiser,
    noise: list[torch.Tensor],
    schedule: PyramidSchedule,
    timesteps: torch.Tensor,
    *,
    method: str = "ddim",
    eta: float = 0.0,
    prediction: str = "v",
    threshold_kind: str = "clip",
    generator: torch.Generator | None = None,
    callback: sampling.StepCallback | None = None,
    progress: bool = False,
    replace_levels: ReplaceLevels | None = None,
) -> list[torch.Tensor]:
    """Any of METHODS by name, one signature: "ddim" (eta), "ddpm" (`sampling.sample`), "dpmpp_2m",
    "euler", "heun" (`solve`). replace_levels is applied to the initial pyramid too, for every method."""
    if method not in METHODS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {', '.join(METHODS)}")
    options = dict(
        prediction=prediction, threshold_kind=threshold_kind, generator=generator, callback=callback,
        progress=progress, replace_levels=replace_levels,
    )
    if method in SOLVERS:
        return solve(denoiser, noise, schedule, timesteps, method=method, eta=eta, **options)
    if replace_levels is not None:
        noise = replace_levels(list(noise), timesteps[0].item())
    return sampling.sample(denoiser, noise, schedule, timesteps, method=method, eta=eta, **options)


def sampler(method: str) -> Callable[..., list[torch.Tensor]]:
    """`run_sampler` with the method fixed: the function a sampler registry (the pipeline's) stores."""
    if method not in METHODS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {', '.join(METHODS)}")

    def run(denoiser, noise, schedule, timesteps, **options) -> list[torch.Tensor]:
        return run_sampler(denoiser, noise, schedule, timesteps, method=method, **options)

    run.__name__ = f"sample_{method}"
    return run
