"""Samplers: step formulas, thresholds, guidance batching, determinism and callbacks."""

from __future__ import annotations

import pytest
import torch

from helpers import run_sampler
from matryoshka import pyramid as pyr
from matryoshka import schedulers
from matryoshka.diffusion import DiffusionConfig, PyramidSchedule
from matryoshka.guidance import classifier_free_guidance
from matryoshka.schedule import spaced_timesteps


def _oracle(clean_pyramid, schedule):
    """A denoiser that knows the clean pyramid: it returns the exact v for any noisy input."""

    def denoise(x_t, t):
        gammas = schedule.at(t + 1)
        out = []
        for x, c, g in zip(x_t, clean_pyramid, gammas, strict=True):
            eps = pyr.eps_from_x0(x, c, g)
            out.append(pyr.target(c, eps, g, "v"))
        return out

    return denoise


@pytest.mark.parametrize("method, eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_samplers_recover_the_oracle_target(method, eta):
    schedule = PyramidSchedule.from_config(DiffusionConfig(), [2, 1])
    clean = pyr.build_pyramid(torch.rand(2, 1, 8, 8) * 1.6 - 0.8, [2, 1])
    noise = pyr.sample_noise(clean, torch.Generator().manual_seed(0))
    out = run_sampler(
        _oracle(clean, schedule), noise, schedule, spaced_timesteps(1000, 10), method=method, eta=eta,
        generator=torch.Generator().manual_seed(1),
    )
    for got, want in zip(out, clean, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_ddim_eta_zero_is_deterministic_and_eta_one_matches_ddpm_variance():
    x_t, x0 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    g, g_s = torch.full((3,), 0.3), torch.full((3,), 0.6)
    z = torch.randn(3, 2, 4, 4)
    a = schedulers.ddim_step(x_t, x0, g, g_s, 1.0, z)
    b = schedulers.ddpm_step(x_t, x0, g, g_s, z)
    # DDIM(eta=1) and ancestral DDPM have the same marginal: same noise coefficient.
    beta_tilde = (1 - 0.3 / 0.6) * (1 - 0.6) / (1 - 0.3)
    assert torch.allclose(a - schedulers.ddim_step(x_t, x0, g, g_s, 1.0, None), beta_tilde**0.5 * z, atol=1e-6)
    assert torch.allclose(b - schedulers.ddpm_step(x_t, x0, g, g_s, None), beta_tilde**0.5 * z, atol=1e-6)
    # eta = 0: x_s = sqrt(g_s) x0 + sqrt(1 - g_s) eps with the eps implied by x_t.
    eps = (x_t - 0.3**0.5 * x0) / 0.7**0.5
    assert torch.allclose(schedulers.ddim_step(x_t, x0, g, g_s, 0.0, z), 0.6**0.5 * x0 + 0.4**0.5 * eps, atol=1e-6)


def test_thresholds():
    x = torch.linspace(-3, 3, 2 * 100).reshape(2, 1, 10, 10)
    assert schedulers.threshold(x, "clip").abs().max() == 1
    assert torch.equal(schedulers.threshold(x, "none"), x)
    dyn = schedulers.threshold(x, "dynamic")
    assert dyn.abs().max() <= 1 + 1e-6 and not torch.allclose(dyn, x.clip(-1, 1))
    dyn_if = schedulers.threshold(x, "dynamic_if")
    s = torch.quantile(x[0].abs().flatten(), 0.95).clamp(max=1.5)
    assert torch.allclose(dyn_if[0], x[0].clamp(-s, s) / s)
    small = torch.full((1, 1, 2, 2), 0.5)
    assert torch.equal(schedulers.threshold(small, "dynamic"), small)  # s is at least 1
    with pytest.raises(ValueError, match="unknown threshold"):
        schedulers.threshold(x, "bogus")


def test_guidance_runs_both_branches_in_one_batch_and_combines_per_level():
    calls = []

    def model(pyramid, t, text_states=None, text_mask=None):
        calls.append(pyramid[0].shape[0])
        return [x * 0 + text_states.mean() for x in pyramid] if False else [
            x * 0 + text_states.sum(dim=(1, 2)).view(-1, 1, 1, 1) for x in pyramid
        ]

    cond = {"text_states": torch.ones(2, 3, 4), "text_mask": torch.ones(2, 3)}
    uncond = {"text_states": torch.zeros(2, 1, 4), "text_mask": torch.ones(2, 1)}  # shorter: padded
    guided = classifier_free_guidance(model, cond, uncond, [2.0, 3.0])
    out = guided([torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 2, 2)], torch.tensor([5, 5]))
    assert calls == [4]
    assert torch.allclose(out[0], torch.full_like(out[0], 24.0))  # 0 + 2 * (12 - 0)
    assert torch.allclose(out[1], torch.full_like(out[1], 36.0))
    plain = classifier_free_guidance(model, cond, uncond, 1.0)
    plain([torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 2, 2)], torch.tensor([5, 5]))
    assert calls[-1] == 2  # scale 1: the conditional branch alone


def test_callback_sees_every_step_and_seeds_reproduce():
    schedule = PyramidSchedule.from_config(DiffusionConfig(), [2, 1])

    def denoiser(x_t, t):
        return [torch.tanh(x) for x in x_t]

    seen = []
    noise = [torch.randn(1, 1, 8, 8), torch.randn(1, 1, 4, 4)]
    steps = spaced_timesteps(1000, 6)
    a = run_sampler(denoiser, noise, schedule, steps, method="ddpm", generator=torch.Generator().manual_seed(3),
                        callback=seen.append)
    b = run_sampler(denoiser, noise, schedule, steps, method="ddpm", generator=torch.Generator().manual_seed(3))
    c = run_sampler(denoiser, noise, schedule, steps, method="ddpm", generator=torch.Generator().manual_seed(4))
    assert [s.index for s in seen] == list(range(6)) and seen[-1].s == 0
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    assert all(x.abs().max() <= 1 for x in a)
