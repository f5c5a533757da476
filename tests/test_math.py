"""Unit tests of the math layer: schedules, shift, step spacing, pyramid, conversions, loss."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matryoshka import losses
from matryoshka import pyramid as pyr
from matryoshka import schedule as sched
from matryoshka.diffusion import DiffusionConfig, PyramidSchedule


@pytest.mark.parametrize("name", sched.SCHEDULES)
def test_base_schedules_are_decreasing_from_one(name):
    g = sched.base_gammas(name, 1000)
    assert g.shape == (1001,)
    assert g[0] == 1.0
    assert torch.all(g[1:] < g[:-1])
    assert 0 <= g[-1] < 0.01


def test_squaredcos_matches_its_definition():
    T = 1000
    abar = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    g = sched.squaredcos_cap_v2(T)
    # Away from the 0.999 cap, the product telescopes to abar(t/T) / abar(0).
    for t in (1, 10, 500, 900):
        assert g[t].item() == pytest.approx(abar(t / T) / abar(0), rel=1e-9)


def test_cosine_logsnr_endpoints():
    g = sched.cosine_logsnr(1000, -5, 5)
    assert sched.log_snr(g[1:2]).item() == pytest.approx(5, abs=1e-6)
    assert sched.log_snr(g[-1:]).item() == pytest.approx(-5, abs=1e-6)


@given(
    gamma=st.floats(1e-6, 1 - 1e-6),
    scale=st.sampled_from([0.25, 0.5, 2, 4, 16]),
    power=st.sampled_from([0.5, 1.0, 2.0]),
)
@settings(max_examples=60, deadline=None)
def test_shift_divides_snr_by_scale_to_the_power(gamma, scale, power):
    g = torch.tensor(gamma, dtype=torch.float64)
    shifted = sched.shift(g, scale, power)
    snr, snr_shifted = g / (1 - g), shifted / (1 - shifted)
    assert snr_shifted.item() == pytest.approx(snr.item() / scale**power, rel=1e-9)


def test_shift_keeps_base_level_and_endpoints():
    g = sched.squaredcos_cap_v2(1000)
    assert torch.equal(sched.shift(g, 1, 2.0), g)
    shifted = sched.shift(g, 4, 1.0)
    assert shifted[0] == 1.0
    assert torch.all(shifted[1:] < g[1:])  # higher resolution = noisier at the same t


def test_base_snr_scale_below_one_anchors_the_schedule_at_the_top_level():
    """base_snr_scale 0.5 on a 32/16 model: the 32 px level gets the unshifted schedule (a single-level
    32 px model's), the 16 px level twice its SNR."""
    unshifted = PyramidSchedule.from_config(DiffusionConfig(), [1]).gammas[0]
    anchored = PyramidSchedule.from_config(DiffusionConfig(base_snr_scale=0.5), [2, 1]).gammas
    torch.testing.assert_close(anchored[0], unshifted, rtol=1e-12, atol=1e-15)
    snr = lambda g: g[1:-1] / (1 - g[1:-1])  # noqa: E731
    torch.testing.assert_close(snr(anchored[1]), 2 * snr(unshifted), rtol=1e-9, atol=0)


def test_official_rescale_schedule_at_or_below_one_leaves_the_schedule_unshifted():
    from matryoshka.interop.mlmdm import _diffusion

    assert _diffusion({"sampler_config": {"rescale_schedule": 0.5}}, 1).base_snr_scale == 1.0
    assert _diffusion({"sampler_config": {"rescale_schedule": 4.0}}, 1).base_snr_scale == 4.0


def test_spaced_timesteps_official_values():
    ts = sched.spaced_timesteps(1000, 50)
    assert ts[0] == 981 and ts[-1] == 0 and len(ts) == 51
    assert torch.all(ts[1:] < ts[:-1])
    assert sched.spaced_timesteps(1000, 8).tolist() == [890, 779, 667, 556, 445, 334, 222, 111, 0]
    with pytest.raises(ValueError):
        sched.spaced_timesteps(1000, 0)


def test_interpolated_log_snr_hits_table_entries():
    g = sched.squaredcos_cap_v2(1000)
    t = torch.tensor([1.0, 250.0, 999.0])
    assert torch.allclose(sched.interpolate_log_snr(g, t), sched.log_snr(g[[1, 250, 999]]))
    mid = sched.interpolate_log_snr(g, torch.tensor([250.5]))
    lo, hi = sched.log_snr(g[[251, 250]])
    assert lo < mid < hi


def test_pyramid_shapes_and_average_pooling():
    x = torch.randn(2, 3, 64, 64)
    levels = pyr.build_pyramid(x, [16, 4, 1])
    assert [tuple(v.shape) for v in levels] == [(2, 3, 64, 64), (2, 3, 16, 16), (2, 3, 4, 4)]
    # The mean of every 4x4 block is the low level pixel.
    assert torch.allclose(levels[1][:, :, 0, 0], x[:, :, :4, :4].mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(levels[2].mean(), x.mean(), atol=1e-5)
    assert pyr.level_shapes((3, 64, 64), [16, 4, 1]) == [(3, 64, 64), (3, 16, 16), (3, 4, 4)]
    with pytest.raises(ValueError):
        pyr.build_pyramid(x, [3, 2])


def test_video_pyramid_pools_space_and_time():
    x = torch.randn(1, 3, 8, 16, 16)
    levels = pyr.build_pyramid(x, [2, 1], time_scales=[4, 1])
    assert levels[1].shape == (1, 3, 2, 8, 8)
    assert torch.allclose(levels[1][:, :, 1], torch.nn.functional.avg_pool2d(x[:, :, 4], 2), atol=1e-6)


def test_noise_is_independent_per_level():
    levels = pyr.build_pyramid(torch.zeros(64, 1, 8, 8), [2, 1])
    noise = pyr.sample_noise(levels, torch.Generator().manual_seed(0))
    pooled = torch.nn.functional.avg_pool2d(noise[0], 2)
    corr = torch.corrcoef(torch.stack([pooled.flatten(), noise[1].flatten()]))[0, 1]
    assert abs(corr) < 0.1
    assert noise[1].std().item() == pytest.approx(1, abs=0.1)  # not pooled noise (that has std 0.5)


@pytest.mark.parametrize("kind", ["v", "eps", "x0"])
def test_prediction_round_trips(kind):
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 3, 8, 8, generator=gen)
    g = torch.tensor([0.99, 0.5, 0.1, 0.01])
    x_t = pyr.add_noise(x0, eps, g)
    pred = pyr.target(x0, eps, g, kind)
    assert torch.allclose(pyr.to_x0(x_t, pred, g, kind), x0, atol=1e-4)
    assert torch.allclose(pyr.eps_from_x0(x_t, x0, g), eps, atol=1e-3)
    for other in ("v", "eps", "x0"):
        converted = pyr.convert(x_t, pred, g, kind, other)
        assert torch.allclose(converted, pyr.target(x0, eps, g, other), atol=1e-3)


def _loss_inputs(batch=4, t=None):
    config = DiffusionConfig(level_weights=[4.0, 1.0])
    schedule = PyramidSchedule.from_config(config, [2, 1])
    gen = torch.Generator().manual_seed(0)
    clean = pyr.build_pyramid(torch.rand(batch, 1, 8, 8, generator=gen) * 2 - 1, [2, 1])
    noise = pyr.sample_noise(clean, gen)
    t = torch.randint(0, 1000, (batch,), generator=gen) if t is None else t
    noisy = [pyr.add_noise(c, n, g) for c, n, g in zip(clean, noise, schedule.at(t + 1), strict=True)]
    return config, schedule, clean, noise, noisy, t


def test_loss_is_zero_for_perfect_predictions_and_weighted_per_level():
    config, schedule, clean, noise, noisy, t = _loss_inputs()
    perfect = [pyr.target(c, n, g, "v") for c, n, g in zip(clean, noise, schedule.at(t + 1), strict=True)]
    out = losses.multi_resolution_loss(perfect, clean, noise, noisy, t, schedule, config)
    assert out.total.abs().max() < 1e-3
    wrong = [p + 0.1 for p in perfect]
    out = losses.multi_resolution_loss(wrong, clean, noise, noisy, t, schedule, config)
    assert torch.allclose(out.total, 4 * out.per_level[0] + out.per_level[1])
    halved = losses.multi_resolution_loss(wrong, clean, noise, noisy, t, schedule, config, level_weights=[0.0, 1.0])
    assert torch.allclose(halved.total, out.per_level[1])


def test_loss_mixed_resolution_batch_masks_rows():
    config, schedule, clean, noise, noisy, t = _loss_inputs(batch=4)
    config.mixed_ratio = [0.5, 1.0]
    rows = losses.rows_per_level(4, config.mixed_ratio, 2)
    assert rows == [2, 4]
    preds = [torch.zeros_like(noisy[0][:2]), torch.zeros_like(noisy[1])]
    out = losses.multi_resolution_loss(preds, clean, noise, [noisy[0][:2], noisy[1]], t, schedule, config)
    assert out.per_level[0].shape == (4,)
    assert torch.all(out.per_level[0][2:] == 0) and torch.all(out.per_level[0][:2] > 0)


def test_loss_weightings_change_the_loss():
    # Small t (high SNR) is where min-SNR clipping and VDM weights differ from 1.
    config, schedule, clean, noise, noisy, t = _loss_inputs(t=torch.tensor([2, 20, 500, 900]))
    preds = [torch.zeros_like(x) for x in noisy]
    base = losses.multi_resolution_loss(preds, clean, noise, noisy, t, schedule, config).total
    for weighting in ("min_snr", "vdm"):
        config.loss_weighting = weighting
        weighted = losses.multi_resolution_loss(preds, clean, noise, noisy, t, schedule, config).total
        assert not torch.allclose(weighted, base)


def test_unshifted_schedule_scales_the_signal():
    config = DiffusionConfig(shift_schedule=False)
    schedule = PyramidSchedule.from_config(config, [4, 1])
    assert schedule.signal_scales == [4.0, 1.0]
    assert torch.equal(schedule.gammas[0], schedule.gammas[1])
    shifted = PyramidSchedule.from_config(DiffusionConfig(shift_power=2.0), [16, 4, 1])
    snr = shifted.gammas / (1 - shifted.gammas)
    assert torch.allclose(snr[0, 500] * 256, snr[2, 500]) and torch.allclose(snr[1, 500] * 16, snr[2, 500])
