"""Schedulers (DDIM, DDPM, DPM-Solver++(2M), Euler, Heun) through the one loop: exactness on an oracle,
accuracy on Gaussian data, continuous time, the registry, diffusers' scheduler conventions, and a real
tiny NestedUNet with fractional times."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import METHODS, SOLVERS, run_sampler
from matryoshka import pyramid as pyr
from matryoshka.diffusion import DiffusionConfig, PyramidSchedule
from matryoshka.models import LevelConfig, ModelConfig, NestedUNet
from matryoshka.schedule import spaced_timesteps

ALL_METHODS = ["ddim", "ddpm", "dpmpp_2m", "euler", "heun"]


@pytest.fixture(scope="module")
def schedule() -> PyramidSchedule:
    """Two levels, 8x8 over 4x4, the top level's SNR shifted by 2 (released defaults otherwise)."""
    return PyramidSchedule.from_config(DiffusionConfig(), [2, 1])


def oracle(clean: list[torch.Tensor], schedule: PyramidSchedule, kind: str = "v"):
    """Knows the clean pyramid: returns the exact prediction of `kind` at any (fractional) time."""

    def denoise(x_t: list[torch.Tensor], t_model: torch.Tensor) -> list[torch.Tensor]:
        gammas = schedule.gammas_at(float(t_model[0]) + 1)
        return [pyr.from_x0(x, c, torch.tensor(g), kind) for x, c, g in zip(x_t, clean, gammas, strict=True)]

    return denoise


def gaussian_denoiser(stds: list[float], schedule: PyramidSchedule):
    """The exact denoiser when every pixel of level r is N(0, stds[r]^2), independently:
    E[x0 | x_t] = sqrt(g) s^2 / (g s^2 + 1 - g) x_t, returned as v."""

    def denoise(x_t: list[torch.Tensor], t_model: torch.Tensor) -> list[torch.Tensor]:
        gammas = schedule.gammas_at(float(t_model[0]) + 1)
        out = []
        for x, g, s in zip(x_t, gammas, stds, strict=True):
            x0 = math.sqrt(g) * s**2 / (g * s**2 + 1 - g) * x
            out.append(pyr.from_x0(x, x0, torch.tensor(g), "v"))
        return out

    return denoise


def gaussian_flow_solution(noise: list[torch.Tensor], stds: list[float], gammas: list[float]) -> list[torch.Tensor]:
    """The exact probability-flow ODE map from x_T (at alpha-bar gammas) to x_0 for Gaussian data:
    in the VE view y = x / sqrt(g) has std sqrt(s^2 + sigma^2) and the flow rescales it to std s."""
    return [
        (x * s / math.sqrt(g * s**2 + 1 - g)).clip(-1, 1) for x, s, g in zip(noise, stds, gammas, strict=True)
    ]


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("kind", ["v", "eps", "x0"])
def test_every_method_recovers_the_clean_pyramid_from_an_oracle(schedule, method, kind):
    clean = pyr.build_pyramid(torch.rand(2, 1, 8, 8) * 1.6 - 0.8, [2, 1])
    noise = pyr.sample_noise(clean, torch.Generator().manual_seed(0))
    out = run_sampler(
        oracle(clean, schedule, kind), noise, schedule, spaced_timesteps(1000, 7), method=method,
        prediction=kind, generator=torch.Generator().manual_seed(1),
    )
    for got, want in zip(out, clean, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", SOLVERS)
def test_fractional_timesteps_interpolate_the_shifted_log_snr(schedule, method):
    clean = pyr.build_pyramid(torch.rand(2, 1, 8, 8) * 1.6 - 0.8, [2, 1])
    noise = pyr.sample_noise(clean, torch.Generator().manual_seed(2))
    seen_times = []

    def recording(x_t, t_model):
        seen_times.append(t_model.clone())
        return oracle(clean, schedule)(x_t, t_model)

    timesteps = torch.linspace(937.5, 0.0, 9, dtype=torch.float64)
    out = run_sampler(recording, noise, schedule, timesteps, method=method)
    for got, want in zip(out, clean, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert seen_times[0].dtype == torch.float32 and float(seen_times[0][0]) == 936.5  # t - 1, not rounded


def test_continuous_gammas_match_the_table_at_integers_and_are_clean_at_zero(schedule):
    for t in (1, 17, 500, 1000):
        assert schedule.gammas_at(t) == pytest.approx(schedule.gammas[:, t].tolist(), rel=1e-12)
    assert schedule.gammas_at(0) == [1.0, 1.0]
    between = schedule.gammas_at(500.5)
    # each level has its own (shifted) schedule, and a midpoint lies between its neighbours
    assert between[0] < between[1]
    for level in range(2):
        assert schedule.gammas[level, 501] < between[level] < schedule.gammas[level, 500]


def test_euler_is_ddim_with_eta_zero(schedule):
    # The VE-Euler step and DDIM(eta = 0) are the same update (Karras et al. 2022, section 3); the
    # denoiser here is nonlinear so the identity is tested on a real trajectory, thresholding included.
    noise = [torch.randn(2, 1, 8, 8), torch.randn(2, 1, 4, 4)]

    def denoiser(x_t, t):
        return [torch.tanh(1.5 * x) for x in x_t]

    steps = spaced_timesteps(1000, 12)
    ddim = run_sampler(denoiser, noise, schedule, steps, method="ddim")
    euler = run_sampler(denoiser, noise, schedule, steps, method="euler")
    for a, b in zip(ddim, euler, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def test_gaussian_data_dpmpp_beats_ddim_at_ten_steps_and_variances_approach_the_data(schedule):
    stds = [0.3, 0.4]  # small enough that the final clip to [-1, 1] barely touches the samples
    generator = torch.Generator().manual_seed(0)
    noise = [torch.randn(96, 1, 8, 8, generator=generator), torch.randn(96, 1, 4, 4, generator=generator)]
    denoiser = gaussian_denoiser(stds, schedule)
    steps = spaced_timesteps(1000, 10)  # 910, 819, ..., 91, 0
    start = int(steps[0])
    exact = gaussian_flow_solution(noise, stds, schedule.gammas_at(start))
    # The fine reference integrates the same ODE from the same start with every integer step (910 steps).
    fine = run_sampler(denoiser, noise, schedule, torch.arange(start, -1, -1), method="ddim",
                               threshold_kind="none")
    for level, (ref, want, s) in enumerate(zip(fine, exact, stds, strict=True)):
        assert rmse(ref, want) < 3e-3, f"level {level}: the 910-step reference is off the closed form"
        assert ref.var().item() == pytest.approx(s**2, rel=0.1), f"level {level}: variance is not the data's"

    errors, variance_bias = {}, {}
    for method in ("ddim", "euler", "dpmpp_2m", "heun"):
        out = run_sampler(denoiser, noise, schedule, steps, method=method, threshold_kind="none")
        errors[method] = [rmse(o, r) for o, r in zip(out, fine, strict=True)]
        variance_bias[method] = [abs(o.var().item() / s**2 - 1) for o, s in zip(out, stds, strict=True)]
    # Ten coarse steps shrink the sample variance (measured var / s^2: ddim 0.56 / 0.74, dpmpp_2m
    # 0.64 / 0.91, heun 0.70 / 0.93 for top / base); the second-order solvers shrink it less, and at
    # 50 steps DPM-Solver++ reaches the data's variance.
    for level in range(2):
        assert variance_bias["dpmpp_2m"][level] < variance_bias["ddim"][level], variance_bias
        assert variance_bias["heun"][level] < variance_bias["ddim"][level], variance_bias
    out = run_sampler(denoiser, noise, schedule, spaced_timesteps(1000, 50), method="dpmpp_2m",
                              threshold_kind="none")
    for o, s in zip(out, stds, strict=True):
        assert o.var().item() == pytest.approx(s**2, rel=0.05)
    # Second-order solvers are closer to the ODE solution than the first-order one at every level
    # (measured: top 0.059 / 0.048 vs 0.076, base 0.015 / 0.010 vs 0.057 for dpmpp_2m / heun vs ddim).
    for level in range(2):
        assert errors["dpmpp_2m"][level] < 0.85 * errors["ddim"][level], errors
        assert errors["heun"][level] < 0.85 * errors["ddim"][level], errors
    assert errors["euler"] == pytest.approx(errors["ddim"], abs=1e-5)
    total = {m: math.hypot(*e) for m, e in errors.items()}
    assert total["dpmpp_2m"] < 0.7 * total["ddim"], total


def test_dpmpp_error_shrinks_faster_than_ddim_with_more_steps(schedule):
    """Order of accuracy on the base (unshifted) level of Gaussian data, from the same start time."""
    stds = [0.3, 0.4]
    generator = torch.Generator().manual_seed(1)
    noise = [torch.randn(32, 1, 8, 8, generator=generator), torch.randn(32, 1, 4, 4, generator=generator)]
    denoiser = gaussian_denoiser(stds, schedule)
    exact = gaussian_flow_solution(noise, stds, schedule.gammas_at(900))
    errors: dict[str, list[float]] = {"ddim": [], "dpmpp_2m": []}
    for num_steps in (10, 20):
        steps = torch.linspace(900, 0, num_steps + 1).round().long()
        for method in errors:
            out = run_sampler(denoiser, noise, schedule, steps, method=method, threshold_kind="none")
            errors[method].append(rmse(out[1], exact[1]))
    ddim_gain = errors["ddim"][0] / errors["ddim"][1]
    dpmpp_gain = errors["dpmpp_2m"][0] / errors["dpmpp_2m"][1]
    assert ddim_gain > 1.4  # first order: about 2x for twice the steps
    assert dpmpp_gain > 2 * ddim_gain, errors


def test_thresholding_applies_to_the_data_prediction(schedule):
    # A denoiser whose x0 is far out of range: clip keeps the samples in range at every step.
    noise = [torch.randn(1, 1, 8, 8), torch.randn(1, 1, 4, 4)]
    seen = []

    def wild(x_t, t):
        gammas = schedule.gammas_at(float(t[0]) + 1)
        return [pyr.from_x0(x, torch.full_like(x, 5.0), torch.tensor(g), "v") for x, g in zip(x_t, gammas, strict=True)]

    for method in SOLVERS:
        seen.clear()
        out = run_sampler(wild, noise, schedule, spaced_timesteps(1000, 4), method=method, callback=seen.append)
        assert all(torch.allclose(x0, torch.ones_like(x0)) for state in seen for x0 in state.x0)
        assert all(torch.allclose(x, torch.ones_like(x)) for x in out)
        unclipped = run_sampler(
            wild, noise, schedule, spaced_timesteps(1000, 4), method=method, threshold_kind="none",
            callback=seen.append,
        )
        assert seen[-1].xt[0].min() > 4.9 and all(x.max() == 1 for x in unclipped)


def test_callback_steps_and_solver_determinism(schedule):
    noise = [torch.randn(2, 1, 8, 8), torch.randn(2, 1, 4, 4)]
    calls = []

    def denoiser(x_t, t):
        calls.append(int(t[0]))
        return [torch.tanh(x) for x in x_t]

    seen = []
    steps = spaced_timesteps(1000, 5)
    a = run_sampler(denoiser, noise, schedule, steps, method="heun", callback=seen.append)
    # Heun: two calls per step (t - 1 and s - 1) except the last step, which ends at the clean end.
    expected = [t - 1 for pair in zip(steps[:-2].tolist(), steps[1:-1].tolist(), strict=True) for t in pair]
    assert calls == [*expected, int(steps[-2]) - 1]
    # The callback sees every network call: 2 per step, 1 for the last.
    assert [state.index for state in seen] == list(range(9)) and seen[-1].s == 0 and seen[0].s == seen[1].t
    b = run_sampler(denoiser, noise, schedule, steps, method="heun")
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_registry_and_bad_input(schedule):
    assert METHODS == ("ddim", "ddpm", "dpmpp_2m", "euler", "heun")
    noise = [torch.randn(1, 1, 8, 8), torch.randn(1, 1, 4, 4)]

    def denoiser(x_t, t):
        return [torch.zeros_like(x) for x in x_t]

    steps = spaced_timesteps(1000, 3)
    with pytest.raises(ValueError, match="unknown sampler 'rk4'"):
        run_sampler(denoiser, noise, schedule, steps, method="rk4")
    with pytest.raises(ValueError, match="eta"):
        run_sampler(denoiser, noise, schedule, steps, method="dpmpp_2m", eta=0.5)
    with pytest.raises(ValueError, match="strictly decreasing"):
        run_sampler(denoiser, noise, schedule, torch.tensor([10, 20, 0]))
    with pytest.raises(ValueError, match=r"lie in \[0, 1000\]"):
        run_sampler(denoiser, noise, schedule, torch.tensor([1200, 0]))
    with pytest.raises(ValueError, match="3 levels"):
        run_sampler(denoiser, [*noise, noise[1]], schedule, steps)
    with pytest.raises(ValueError, match="prediction kind"):
        run_sampler(denoiser, noise, schedule, steps, prediction="score")
    for method in METHODS:
        out = run_sampler(denoiser, noise, schedule, steps, method=method)
        assert [x.shape for x in out] == [x.shape for x in noise]


def test_pipeline_dispatches_the_solvers_by_name():
    from matryoshka.pipeline import available_samplers

    assert set(METHODS) <= set(available_samplers())


def test_tiny_nested_unet_with_fractional_times_runs_every_solver():
    outer = LevelConfig([8, 8], [1, 1], norm_groups=4, temb_dim=32)
    core = LevelConfig([8, 16], [1, 1], attention_layers=[0, 1], num_heads=2, norm_groups=4, temb_dim=32)
    config = ModelConfig(levels=[outer, core], image_size=16, in_channels=1)
    config.validate()
    torch.manual_seed(0)
    model = NestedUNet(config).eval()
    schedule = PyramidSchedule.from_config(DiffusionConfig(), config.scales)
    noise = [torch.randn(2, 1, s, s) for s in config.sizes]
    float_steps = torch.tensor([900.5, 600.25, 300.0, 0.0], dtype=torch.float64)
    int_steps = torch.tensor([900, 600, 300, 0])
    outputs = {}
    for method in SOLVERS:
        outputs[method] = run_sampler(model, noise, schedule, float_steps, method=method)
        assert all(torch.isfinite(x).all() and x.abs().max() <= 1 for x in outputs[method])
    near = run_sampler(model, noise, schedule, int_steps, method="dpmpp_2m")
    # moving the times by a fraction of a step moves the result a little, not a lot
    assert 0 < max(rmse(a, b) for a, b in zip(outputs["dpmpp_2m"], near, strict=True)) < 0.1
