"""Scheduler objects over a pyramid, in the shape of diffusers' schedulers (REFERENCE.md sections 4, 4b).

A scheduler turns network outputs into the next state of every level. It holds its own state (the step
index, a multistep solver's previous estimate, Heun's predictor) and offers

    scheduler.set_timesteps(num_inference_steps, schedule, prediction=..., threshold=...)
    for t in scheduler.timesteps:                                  # the times the network is called at
        output = denoiser(scheduler.scale_model_input(sample), scheduler.model_time(batch, device))
        sample = scheduler.step(output, sample, generator).prev_sample

`matryoshka.sampling.sample` is that loop. All levels move jointly along one time grid t_0 > ... > t_K = 0
(the official spacing, REFERENCE.md section 4), each along its own shifted schedule: level r's alpha-bar at
time t is `PyramidSchedule.gammas_at(t)[r]`. The network receives t - 1. Every step converts the output
(v, eps, x0 or flow velocity) to a clean estimate x0 per level and thresholds it, then:

- "ddim": DDIM(eta). eps = (x_t - sqrt(g) x0) / sqrt(1 - g); beta~ = eta^2 (1 - g / g_s)(1 - g_s) / (1 - g);
  x_s = sqrt(g_s) x0 + sqrt(1 - g_s - beta~) eps + sqrt(beta~) z.
- "ddpm": ancestral: the posterior q(x_s | x_t, x0) mean plus its standard deviation times z.
- "euler": one Euler step of the probability-flow ODE in the variance-exploding view y = x / sqrt(g),
  dy/ds = (y - x0) / s with s = sqrt((1 - g) / g); algebraically DDIM(eta = 0), and for a flow model
  (prediction "flow") exactly the Euler step x_s = x_t + (t_s - t) u of the flow in its own time.
- "heun": Karras et al.'s Algorithm 1 without churn: an Euler predictor, a second network call at the
  step's end, the trapezoidal corrector; the last step to the clean end is plain Euler.
- "dpmpp_2m": DPM-Solver++(2M) (Lu et al. 2022), multistep second order in data prediction:
  h = lambda_s - lambda_t, x_s = (sigma_s / sigma_t) x_t - alpha_s expm1(-h) D, D = (1 + 1/2r) x0_t - 1/2r x0_prev,
  r = h_prev / h (first step and the step to t = 0: D = x0_t).

Schedulers are interchangeable: `pipe.scheduler = EulerScheduler.from_config(pipe.scheduler.config)`; the
names above are shorthands (`make_scheduler("heun")`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from matryoshka import pyramid as pyr
from matryoshka.diffusion import PyramidSchedule
from matryoshka.schedule import spaced_timesteps

PREDICTIONS = ("v", "eps", "x0", "flow")


@dataclass
class SchedulerConfig:
    """What `from_config` reads and a model directory saves (`sampling.sampler`, `sampling.eta`)."""

    name: str = "ddim"
    eta: float = 0.0  # ddim: 0 deterministic, 1 DDPM-like noise; the other schedulers ignore it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SchedulerOutput:
    """What one step gives: the next state of every level (at `time`) and the clean estimates used."""

    prev_sample: list[torch.Tensor]
    pred_original_sample: list[torch.Tensor]
    time: float


def threshold(x0: torch.Tensor, kind: str, signal_scale: float = 1.0) -> torch.Tensor:
    """Keep the x0 estimate in range: "clip" to [-1, 1]; "dynamic" (Imagen: 99.5th percentile of |x0|,
    at most 100) or "dynamic_if" (DeepFloyd IF: 95th percentile, at most 1.5) rescale each sample by
    its percentile s >= 1 after clipping to [-s, s]; "none". signal_scale: the level's signal was
    divided by it, so the range is [-1/scale, 1/scale]."""
    if kind == "none":
        return x0
    x = x0 * signal_scale
    if kind == "clip":
        x = x.clip(-1, 1)
    elif kind in ("dynamic", "dynamic_if"):
        ratio, max_value = (0.995, 100.0) if kind == "dynamic" else (0.95, 1.5)
        flat = x.float().reshape(x.shape[0], -1)
        s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
        x = (flat.clamp(-s, s) / s).reshape(x.shape).to(x0.dtype)
    else:
        raise ValueError(f"unknown threshold {kind!r}; use clip, dynamic, dynamic_if or none")
    return x / signal_scale


def ddim_step(
    x_t: torch.Tensor, x0: torch.Tensor, g: torch.Tensor | float, g_s: torch.Tensor | float, eta: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """DDIM(eta) from alpha-bar g to g_s (floats, or (B,) tensors) given the x0 estimate."""
    g, g_s = _as_level(g, x_t), _as_level(g_s, x_t)
    eps = (x_t - g.sqrt() * x0) / (1 - g).sqrt()
    if eta <= 0:
        return g_s.sqrt() * x0 + (1 - g_s).sqrt() * eps
    beta_tilde = eta**2 * (1 - g / g_s) * (1 - g_s) / (1 - g)
    x_s = g_s.sqrt() * x0 + (1 - g_s - beta_tilde).clamp(min=0).sqrt() * eps
    return x_s if noise is None else x_s + beta_tilde.sqrt() * noise


def ddpm_step(
    x_t: torch.Tensor, x0: torch.Tensor, g: torch.Tensor | float, g_s: torch.Tensor | float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """Ancestral DDPM step: the posterior q(x_s | x_t, x0) mean plus its standard deviation times noise."""
    g, g_s = _as_level(g, x_t), _as_level(g_s, x_t)
    alpha = g / g_s
    beta = 1 - alpha
    mean = x0 * beta * g_s.sqrt() / (1 - g) + x_t * alpha.sqrt() * (1 - g_s) / (1 - g)
    if noise is None:
        return mean
    return mean + (beta * (1 - g_s) / (1 - g)).sqrt() * noise


Generators = torch.Generator | list[torch.Generator] | None


def randn(shape: tuple[int, ...], generator: Generators, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise of `shape` (B, ...); with a list of B generators, row i comes from generator i,
    so a batch draws exactly what B calls of one sample each would."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: give one per image")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def _as_level(g: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    if isinstance(g, torch.Tensor):
        return pyr._expand(g, like)
    return torch.tensor(g, dtype=like.dtype, device=like.device)


class Scheduler:
    """The common part: time grid, network inputs, x0 estimates. Subclasses define `_update` (one step of
    a level from t to s) and, for several network calls per step, the call times."""

    name: ClassVar[str] = ""
    stochastic: ClassVar[bool] = False  # uses eta / draws noise

    def __init__(self, eta: float = 0.0) -> None:
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if eta != 0 and not self.stochastic:
            raise ValueError(f"eta = {eta} has no meaning for the deterministic {self.name!r} scheduler; use ddim")
        self.config = SchedulerConfig(self.name, float(eta))
        self.times: list[float] = []
        self.timesteps = torch.zeros(0)

    @classmethod
    def from_config(cls, config: SchedulerConfig | dict[str, Any]) -> Scheduler:
        """A scheduler of this class with the options of `config` that apply to it (diffusers' from_config)."""
        values = config.to_dict() if isinstance(config, SchedulerConfig) else dict(config)
        return cls(eta=values.get("eta", 0.0) if cls.stochastic else 0.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eta={self.config.eta})" if self.stochastic else f"{type(self).__name__}()"

    # ---- the time grid ------------------------------------------------------------------------------

    def set_timesteps(
        self, num_inference_steps: int | None, schedule: PyramidSchedule, *, prediction: str = "v",
        threshold: str = "clip", timesteps: torch.Tensor | list[float] | None = None,
    ) -> None:
        """The official spacing of `num_inference_steps` steps (or the given descending `timesteps`, state
        times in [0, T]); prediction: what the network outputs; threshold: how x0 is kept in range."""
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction kind {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        if timesteps is None:
            if num_inference_steps is None:
                raise ValueError("give num_inference_steps or timesteps")
            timesteps = spaced_timesteps(schedule.num_train_steps, num_inference_steps)
        times = torch.as_tensor(timesteps)
        if times.ndim != 1 or times.numel() < 2:
            raise ValueError(f"timesteps must be a 1-D list of at least 2 times, got shape {tuple(times.shape)}")
        self.integer_times = not times.is_floating_point()
        self.times = [float(t) for t in times.tolist()]
        if any(not b < a for a, b in zip(self.times, self.times[1:], strict=False)):
            raise ValueError(f"timesteps must be strictly decreasing, got {self.times}")
        if self.times[-1] < 0 or self.times[0] > schedule.num_train_steps:
            raise ValueError(f"timesteps must lie in [0, {schedule.num_train_steps}], got {self.times}")
        self.schedule, self.prediction, self.threshold_kind = schedule, prediction, threshold
        self._gammas = [schedule.gammas_at(t) for t in self.times]
        self._calls = self._call_plan()
        self.timesteps = torch.tensor([time for time, _ in self._calls])
        self.step_index = 0
        self._reset()

    def _call_plan(self) -> list[tuple[float, int]]:
        """(state time of each network call, the interval it belongs to); one call per interval."""
        return [(self.times[i], i) for i in range(len(self.times) - 1)]

    def _reset(self) -> None:
        """Forget the state of a previous run."""

    @property
    def current_time(self) -> float:
        return self._calls[self.step_index][0]

    @property
    def start_time(self) -> float:
        return self.times[0]

    def model_time(self, batch: int, device: torch.device) -> torch.Tensor:
        """The network's time argument for the current call: state time - 1 (as the official code)."""
        dtype = torch.long if self.integer_times else torch.float32
        return torch.full((batch,), self.current_time - 1, dtype=dtype, device=device)

    def scale_model_input(self, sample: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the network sees of the current state: the state itself, or a flow model's flow state."""
        gammas = self.schedule.gammas_at(self.current_time)
        return [pyr.model_input(x, _as_level(g, x), self.prediction) for x, g in zip(sample, gammas, strict=True)]

    def clean_estimate(self, model_output: list[torch.Tensor], sample: list[torch.Tensor], time: float):
        """Thresholded x0 of every level from the network's outputs at state time `time`."""
        if len(model_output) != len(sample):
            raise ValueError(f"the denoiser returned {len(model_output)} levels for a {len(sample)}-level pyramid")
        gammas = self.schedule.gammas_at(time)
        x0s = []
        for level, (x, out) in enumerate(zip(sample, model_output, strict=True)):
            x0 = pyr.to_x0(x, out, _as_level(gammas[level], x), self.prediction)
            x0s.append(threshold(x0, self.threshold_kind, self.schedule.signal_scales[level]))
        return x0s

    # ---- one step -----------------------------------------------------------------------------------

    def step(
        self, model_output: list[torch.Tensor], sample: list[torch.Tensor], generator: Generators = None
    ) -> SchedulerOutput:
        """Advance every level by one network call's worth; returns the new state and the x0 estimates."""
        if not self.times:
            raise RuntimeError("call set_timesteps before step")
        if self.step_index >= len(self._calls):
            raise RuntimeError(f"all {len(self._calls)} steps were taken; call set_timesteps again")
        interval = self._calls[self.step_index][1]
        x0s = self.clean_estimate(model_output, sample, self.current_time)
        out, time = self._advance(sample, x0s, interval, generator)
        self.step_index += 1
        return SchedulerOutput(out, x0s, time)

    def _advance(self, sample, x0s, interval, generator) -> tuple[list[torch.Tensor], float]:
        s = self.times[interval + 1]
        g_t, g_s = self._gammas[interval], self._gammas[interval + 1]
        out = []
        for level, (x, x0) in enumerate(zip(sample, x0s, strict=True)):
            noise = None
            if self.stochastic and s > 0 and self._draws_noise():
                noise = randn(tuple(x.shape), generator, x.device, x.dtype)
            out.append(self._update(x, x0, g_t[level], g_s[level], level, interval, noise))
        return out, s

    def _draws_noise(self) -> bool:
        return True

    def _update(self, x, x0, g, g_s, level, interval, noise) -> torch.Tensor:
        """One level's step from gamma g to g_s, used by the default `_advance`; schedulers that replace
        `_advance` (DPM-Solver++ 2M keeps a history) do not need it."""
        raise TypeError(f"{type(self).__name__} defines neither _update nor _advance")


class DDIMScheduler(Scheduler):
    name = "ddim"
    stochastic = True

    def _draws_noise(self) -> bool:
        return self.config.eta > 0

    def _update(self, x, x0, g, g_s, level, interval, noise):
        return ddim_step(x, x0, g, g_s, self.config.eta, noise)


class DDPMScheduler(Scheduler):
    name = "ddpm"
    stochastic = True

    @classmethod
    def from_config(cls, config: SchedulerConfig | dict[str, Any]) -> Scheduler:
        return cls()  # ancestral sampling has no eta

    def __init__(self, eta: float = 0.0) -> None:
        super().__init__(0.0)

    def _update(self, x, x0, g, g_s, level, interval, noise):
        return ddpm_step(x, x0, g, g_s, noise)


def _euler_ve(x: torch.Tensor, x0: torch.Tensor, g: float, g_s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler step of dy/ds = (y - x0) / s from alpha-bar g to g_s: (the state at g_s, dy/ds)."""
    s_t, s_s = math.sqrt((1 - g) / g), math.sqrt((1 - g_s) / g_s)
    slope = (x / math.sqrt(g) - x0) / s_t
    return (x / math.sqrt(g) + (s_s - s_t) * slope) * math.sqrt(g_s), slope


class EulerScheduler(Scheduler):
    name = "euler"

    def _update(self, x, x0, g, g_s, level, interval, noise):
        return _euler_ve(x, x0, g, g_s)[0]


class HeunScheduler(Scheduler):
    """Two network calls per step (an Euler predictor, then the corrector at the step's end), one for the
    last step to the clean end."""

    name = "heun"

    def _call_plan(self) -> list[tuple[float, int]]:
        plan = []
        for i in range(len(self.times) - 1):
            plan.append((self.times[i], i))
            if self.times[i + 1] > 0:
                plan.append((self.times[i + 1], i))  # the corrector's call at the end point
        return plan

    def _reset(self) -> None:
        self._predictor: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # (x_t, dy/ds) per level

    def _advance(self, sample, x0s, interval, generator):
        s = self.times[interval + 1]
        g_t, g_s = self._gammas[interval], self._gammas[interval + 1]
        if self._predictor is None:  # the predictor call, at t
            euler = [_euler_ve(x, x0, g_t[r], g_s[r]) for r, (x, x0) in enumerate(zip(sample, x0s, strict=True))]
            predicted = [state for state, _ in euler]
            if s > 0:
                self._predictor = (list(sample), [slope for _, slope in euler])
            return predicted, s
        starts, slopes = self._predictor  # the corrector call, at s: the trapezoid of both slopes
        self._predictor = None
        out = []
        for r, (predicted, x0_end) in enumerate(zip(sample, x0s, strict=True)):
            s_t, s_s = math.sqrt((1 - g_t[r]) / g_t[r]), math.sqrt((1 - g_s[r]) / g_s[r])
            slope_end = (predicted / math.sqrt(g_s[r]) - x0_end) / s_s
            y = starts[r] / math.sqrt(g_t[r]) + (s_s - s_t) * 0.5 * (slopes[r] + slope_end)
            out.append(y * math.sqrt(g_s[r]))
        return out, s


def _half_log_snr(gamma: float) -> float:
    """lambda = log(alpha / sigma) = log-SNR / 2 (DPM-Solver's lambda); +inf at the clean end."""
    return math.inf if gamma >= 1 else 0.5 * (math.log(gamma) - math.log1p(-gamma))


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++(2M): the previous step's x0 and step size per level are its state."""

    name = "dpmpp_2m"

    def _reset(self) -> None:
        self._previous: tuple[list[torch.Tensor], list[float]] | None = None

    def _advance(self, sample, x0s, interval, generator):
        s = self.times[interval + 1]
        g_t, g_s = self._gammas[interval], self._gammas[interval + 1]
        out, steps = [], []
        for r, (x, x0) in enumerate(zip(sample, x0s, strict=True)):
            if g_s[r] >= 1:  # the clean end: the first-order update is x0 itself
                out.append(x0)
                steps.append(math.inf)
                continue
            h = _half_log_snr(g_s[r]) - _half_log_snr(g_t[r])
            data = x0
            if self._previous is not None:
                ratio = self._previous[1][r] / h
                data = (1 + 0.5 / ratio) * x0 - (0.5 / ratio) * self._previous[0][r]
            out.append(math.sqrt((1 - g_s[r]) / (1 - g_t[r])) * x - math.sqrt(g_s[r]) * math.expm1(-h) * data)
            steps.append(h)
        self._previous = (x0s, steps)
        return out, s


SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls for cls in (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerScheduler, HeunScheduler)
}


def register_scheduler(name: str, cls: type[Scheduler], *, replace_existing: bool = False) -> None:
    """Makes `pipe(..., sampler=name)` and `matryoshka generate --sampler name` use `cls`."""
    if name in SCHEDULERS and not replace_existing:
        raise ValueError(f"a scheduler named {name!r} is already registered (pass replace_existing=True)")
    SCHEDULERS[name] = cls


def available_schedulers() -> list[str]:
    return sorted(SCHEDULERS)


def make_scheduler(name: str | SchedulerConfig, eta: float = 0.0) -> Scheduler:
    """A scheduler by its shorthand ("ddim", "ddpm", "dpmpp_2m", "euler", "heun") or config."""
    if isinstance(name, SchedulerConfig):
        name, eta = name.name, name.eta
    if name not in SCHEDULERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(available_schedulers())}")
    return SCHEDULERS[name](eta=eta)


__all__ = [
    "SCHEDULERS",
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerScheduler",
    "HeunScheduler",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "available_schedulers",
    "ddim_step",
    "ddpm_step",
    "make_scheduler",
    "randn",
    "register_scheduler",
    "threshold",
]
