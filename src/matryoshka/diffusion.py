"""The diffusion process of a pyramid: its configuration and the per-level noise schedules.

`DiffusionConfig` is the math half of a model directory's config (the network is the other half).
`PyramidSchedule` turns it into one alpha-bar table per level, so the training loss and every
sampler read the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from matryoshka import schedule as sched
from matryoshka.typed_config import require

Prediction = Literal["v", "eps", "x0", "flow"]
Weighting = Literal["none", "vdm", "min_snr", "soft_min_snr", "sigmoid"]
Threshold = Literal["clip", "dynamic", "dynamic_if", "none"]


@dataclass
class DiffusionConfig:
    """How images are noised and what the network predicts.

    Defaults are the released MDM models': squaredcos_cap_v2 over 1000 steps, shifted per level,
    v-prediction, loss on eps, clip thresholding.
    """

    # "rectified_flow": the flow-matching path (1 - t) x0 + t eps; with prediction and loss_target "flow"
    # this is the flow-matching objective over the pyramid (each level's t shifted by the SNR shift).
    schedule: Literal["squaredcos_cap_v2", "cosine_logsnr", "linear", "rectified_flow"] = "squaredcos_cap_v2"
    num_train_steps: int = 1000
    beta_start: float = 1e-4  # linear schedule only
    beta_end: float = 0.02
    logsnr_min: float = -5.0  # cosine_logsnr only
    logsnr_max: float = 5.0
    # SNR of the whole base schedule divided by base_snr_scale**shift_power (ml-mdm's rescale_schedule,
    # which ignores factors <= 1; here 0.5 doubles the SNR, e.g. to anchor the schedule at the top level).
    base_snr_scale: float = 1.0
    # Per-level shift: a level `s` times the base side gets SNR / s**shift_power. When false, ml-mdm
    # instead divides that level's signal by s (and multiplies it back after sampling).
    shift_schedule: bool = True
    shift_power: float = 1.0
    # What the network predicts: v, eps, x0, or "flow" (it sees the flow state and predicts eps - x0).
    prediction: Prediction = "v"
    loss_target: Prediction = "eps"
    # Weight of each sample's loss by its level's log-SNR lambda (losses.py has the formulas): one name,
    # or one per level (highest first). "none" is plain MSE on loss_target.
    loss_weighting: Weighting | list[Weighting] = "none"
    min_snr_gamma: float = 5.0  # min_snr and soft_min_snr
    sigmoid_bias: float | list[float] = 2.0  # sigmoid: w = sigmoid(b - lambda); one b, or one per level
    # Weight of each level's loss, highest resolution first; null = 1 for every level.
    level_weights: list[float] | None = None
    # Fraction of each batch that carries each level (highest first, the last must be 1); null = all.
    mixed_ratio: list[float] | None = None
    threshold: Threshold = "clip"
    # Divide a single-level model's signal by this (ml-mdm's rescale_signal); nested models ignore it.
    rescale_signal: float = 1.0

    def validate(self) -> None:
        require(self.num_train_steps >= 2, "num_train_steps", "must be at least 2")
        require(self.base_snr_scale > 0, "base_snr_scale", "must be positive")
        require(self.shift_power >= 0, "shift_power", "must be >= 0")
        require(self.rescale_signal > 0, "rescale_signal", "must be positive")
        require(self.min_snr_gamma > 0, "min_snr_gamma", "must be positive")
        if self.level_weights is not None:
            require(all(w >= 0 for w in self.level_weights), "level_weights", "weights must be >= 0")
        if self.mixed_ratio is not None:
            require(all(0 < r <= 1 for r in self.mixed_ratio), "mixed_ratio", "fractions must be in (0, 1]")
            require(self.mixed_ratio[-1] == 1, "mixed_ratio", "the last (base) level must carry the whole batch (1.0)")

    def check_levels(self, num_levels: int) -> None:
        """Check the per-level lists against the model's number of levels."""
        for name in ("level_weights", "mixed_ratio", "loss_weighting", "sigmoid_bias"):
            values = getattr(self, name)
            if not isinstance(values, list):
                continue
            require(
                len(values) == num_levels, name, f"has {len(values)} entries but the model has {num_levels} levels"
            )

    def weighting_of(self, level: int) -> str:
        """The loss weighting of level `level` (0 = highest resolution)."""
        return self.loss_weighting[level] if isinstance(self.loss_weighting, list) else self.loss_weighting

    def sigmoid_bias_of(self, level: int) -> float:
        return self.sigmoid_bias[level] if isinstance(self.sigmoid_bias, list) else self.sigmoid_bias


@dataclass
class PyramidSchedule:
    """Per-level alpha-bar tables of one nested model.

    gammas: (R, T + 1) float64, highest resolution first; index 0 = clean.
    signal_scales: R floats; the level's signal is divided by it before noising (1 = untouched).
    """

    gammas: torch.Tensor
    signal_scales: list[float] = field(default_factory=list)
    base: torch.Tensor | None = None  # (T + 1,) the unshifted table, for VDM weights
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_config(cls, config: DiffusionConfig, scales: list[int]) -> PyramidSchedule:
        """scales: each level's side divided by the base side, highest first (e.g. [4, 1])."""
        base = sched.base_gammas(
            config.schedule, config.num_train_steps, config.beta_start, config.beta_end,
            config.logsnr_min, config.logsnr_max,
        )
        base = sched.shift(base, config.base_snr_scale, config.shift_power)
        if config.shift_schedule:
            tables = [sched.shift(base, s, config.shift_power) for s in scales]
            signal_scales = [1.0] * len(scales)
        else:
            tables = [base for _ in scales]
            signal_scales = [float(s) for s in scales]
        if len(scales) == 1:
            signal_scales = [config.rescale_signal]
        return cls(torch.stack(tables), signal_scales, base)

    @property
    def num_levels(self) -> int:
        return self.gammas.shape[0]

    @property
    def num_train_steps(self) -> int:
        return self.gammas.shape[1] - 1

    def table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The (R, T + 1) table on a device, cached so that sampling loops copy it only once."""
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache[key] = self.gammas.to(device=device, dtype=dtype)
        return self._cache[key]

    def at(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """alpha-bar of every level at integer times t (B,) -> R tensors of shape (B,)."""
        table = self.table(t.device, dtype)
        return [table[level][t] for level in range(self.num_levels)]

    def gammas_at(self, t: float) -> list[float]:
        """alpha-bar of every level at continuous time t in [0, T] (highest first), as floats.

        Integer t reads the table exactly; fractional t interpolates each level's log-SNR linearly between
        the discrete entries; t <= 0 is exactly 1 (clean)."""
        if t <= 0:
            return [1.0] * self.num_levels
        if float(t) == int(t):
            return [float(g) for g in self.gammas[:, int(t)].tolist()]
        time = torch.tensor(float(t), dtype=torch.float64)
        return [
            float(torch.sigmoid(sched.interpolate_log_snr(self.gammas[level].cpu(), time)))
            for level in range(self.num_levels)
        ]

    def scale_signal(self, pyramid: list[torch.Tensor]) -> list[torch.Tensor]:
        """Divide each clean level by its signal scale before noising (a no-op for shifted schedules)."""
        return [x if scale == 1 else x / scale for x, scale in zip(pyramid, self.signal_scales, strict=True)]

    def to(self, device: torch.device | str) -> PyramidSchedule:
        return PyramidSchedule(
            self.gammas.to(device), self.signal_scales, None if self.base is None else self.base.to(device)
        )
