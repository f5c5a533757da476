"""Image-conditioned generation (super-resolution, variations) through `sampling.condition_on_levels`,
for every sampler, and guidance scales set per level."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import METHODS, run_sampler
from matryoshka import pyramid as pyr
from matryoshka import sampling
from matryoshka.diffusion import DiffusionConfig, PyramidSchedule
from matryoshka.guidance import classifier_free_guidance
from matryoshka.models import LevelConfig, ModelConfig, NestedUNet
from matryoshka.schedule import spaced_timesteps

DATA_STD = 0.5


@pytest.fixture(scope="module")
def schedule() -> PyramidSchedule:
    return PyramidSchedule.from_config(DiffusionConfig(), [2, 1])


def tiny_config(num_classes: int = 0) -> ModelConfig:
    outer = LevelConfig([8, 8], [1, 1], norm_groups=4, temb_dim=32)
    core = LevelConfig([8, 16], [1, 1], attention_layers=[0, 1], num_heads=2, norm_groups=4, temb_dim=32)
    config = ModelConfig(levels=[outer, core], image_size=16, in_channels=1, num_classes=num_classes)
    config.validate()
    return config


def random_model(config: ModelConfig) -> NestedUNet:
    """Random weights everywhere (zero-initialised layers included), so every input reaches the output."""
    torch.manual_seed(0)
    model = NestedUNet(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return model.eval()


def nested_gaussian_denoiser(schedule: PyramidSchedule):
    """The exact denoiser of a two-level distribution whose levels depend on each other: the base b is
    N(0, DATA_STD^2) per pixel and the top is b upsampled 2x (so avg-pool(top) = b). Both noisy levels
    observe b; E[b | x_t] is the Gaussian posterior mean from the 4 top pixels of a block and the base
    pixel, each weighted by its own (shifted) SNR. Returned as v for both levels."""

    def denoise(x_t: list[torch.Tensor], t_model: torch.Tensor) -> list[torch.Tensor]:
        g_top, g_base = schedule.gammas_at(float(t_model[0]) + 1)
        top, base = x_t
        precision = 1 / DATA_STD**2 + 4 * g_top / (1 - g_top) + g_base / (1 - g_base)
        block_sum = 4 * F.avg_pool2d(top, 2)
        b = (math.sqrt(g_top) / (1 - g_top) * block_sum + math.sqrt(g_base) / (1 - g_base) * base) / precision
        x0s = [F.interpolate(b, scale_factor=2, mode="nearest"), b]
        return [pyr.from_x0(x, x0, torch.tensor(g), "v") for x, x0, g in zip(x_t, x0s, (g_top, g_base), strict=True)]

    return denoise


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("method", METHODS)
def test_low_level_is_the_given_image_and_the_top_level_follows_it(schedule, method):
    """With an exact joint denoiser, conditioning pulls avg-pool(top) to the given base image.

    What this shows: the hook pins the base level at every step and the samplers carry that into the
    joint denoising of the top level. Replacement conditioning is approximate (the top level's own
    noisy state also informs b), so the pooled top is closer, not equal: measured RMSE at 20 steps
    0.20-0.28 conditioned against 0.65-0.70 free (data std 0.5); it shrinks with more steps.
    """
    generator = torch.Generator().manual_seed(0)
    image = (torch.randn(8, 1, 4, 4, generator=generator) * DATA_STD).clip(-1, 1)
    noise = [torch.randn(8, 1, 8, 8, generator=generator), torch.randn(8, 1, 4, 4, generator=generator)]
    denoiser = nested_gaussian_denoiser(schedule)
    steps = spaced_timesteps(1000, 20)
    hook = sampling.condition_on_levels({1: image}, schedule, torch.Generator().manual_seed(1))
    conditioned = run_sampler(denoiser, noise, schedule, steps, method=method, replace_levels=hook,
                                      generator=torch.Generator().manual_seed(2))
    free = run_sampler(denoiser, noise, schedule, steps, method=method,
                               generator=torch.Generator().manual_seed(2))
    assert torch.equal(conditioned[1], image)
    pooled_error = rmse(F.avg_pool2d(conditioned[0], 2), image)
    free_error = rmse(F.avg_pool2d(free[0], 2), image)
    assert pooled_error < 0.3 and pooled_error < 0.5 * free_error, (pooled_error, free_error)


def test_random_model_sees_the_image_noised_to_every_step_time_and_returns_it(schedule):
    config = tiny_config()
    model = random_model(config)
    image = torch.rand(1, 8, 8) * 2 - 1  # (C, H, W): the same base image for every sample
    base_inputs: list[torch.Tensor] = []

    def recording(pyramid, t):
        base_inputs.append(pyramid[1].clone())
        return model(pyramid, t)

    noise = [torch.randn(2, 1, 16, 16), torch.randn(2, 1, 8, 8)]
    steps = spaced_timesteps(1000, 3)
    hook = sampling.condition_on_levels({1: image}, schedule, torch.Generator().manual_seed(7))
    out = run_sampler(recording, noise, schedule, steps, method="ddim", replace_levels=hook)
    assert torch.equal(out[1], image.expand(2, -1, -1, -1))
    # The network saw the image noised to each step's start time, with fresh noise from the generator.
    replay = torch.Generator().manual_seed(7)
    gammas = schedule.gammas[1]
    for seen, t in zip(base_inputs, steps[:-1].tolist(), strict=True):
        z = torch.randn((2, 1, 8, 8), generator=replay)
        torch.testing.assert_close(seen, pyr.add_noise(image.expand(2, -1, -1, -1), z, gammas[t].float()))
    # A random network gives no meaningful top level, but the top level does depend on the image.
    other = sampling.condition_on_levels({1: -image}, schedule, torch.Generator().manual_seed(7))
    flipped = run_sampler(model, noise, schedule, steps, method="ddim", replace_levels=other)
    assert not torch.allclose(out[0], flipped[0])


@pytest.mark.parametrize("method", ["ddpm", "dpmpp_2m", "heun"])
def test_random_model_returns_the_given_image_for_other_samplers(schedule, method):
    model = random_model(tiny_config())
    images = torch.rand(2, 1, 8, 8) * 2 - 1  # one image per sample
    noise = [torch.randn(2, 1, 16, 16), torch.randn(2, 1, 8, 8)]
    hook = sampling.condition_on_levels({1: images}, schedule, torch.Generator().manual_seed(0))
    out = run_sampler(model, noise, schedule, spaced_timesteps(1000, 2), method=method, replace_levels=hook,
                              generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[1], images)
    assert out[0].shape == (2, 1, 16, 16) and out[0].abs().max() <= 1


def test_fractional_times_and_signal_scales(schedule):
    # Unshifted levels with a divided signal (shift_schedule = False): the known top level has signal
    # scale 2, so the hook stores image / 2 and the sampler multiplies it back.
    scaled = PyramidSchedule.from_config(DiffusionConfig(shift_schedule=False), [2, 1])
    assert scaled.signal_scales == [2.0, 1.0]
    top = torch.rand(1, 1, 8, 8) * 2 - 1
    clean = pyr.build_pyramid(top, [2, 1])
    hook = sampling.condition_on_levels({0: top}, scaled, torch.Generator().manual_seed(0))
    pinned = hook([torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 4, 4)], 0)
    torch.testing.assert_close(pinned[0], top / 2)
    noise = pyr.sample_noise(clean, torch.Generator().manual_seed(1))

    def oracle(x_t, t):
        gammas = scaled.gammas_at(float(t[0]) + 1)
        targets = scaled.scale_signal(clean)
        return [pyr.from_x0(x, c, torch.tensor(g), "v") for x, c, g in zip(x_t, targets, gammas, strict=True)]

    out = run_sampler(oracle, noise, scaled, torch.tensor([700.5, 350.25, 0.0], dtype=torch.float64),
                        method="heun", replace_levels=hook)
    torch.testing.assert_close(out[0], top)
    torch.testing.assert_close(out[1], clean[1], atol=1e-5, rtol=0)
    # at a fractional time the known level is noised with the interpolated schedule
    mid = hook([torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 4, 4)], 350.5)[0]
    g = scaled.gammas_at(350.5)[0]
    assert scaled.gammas[0, 351] < g < scaled.gammas[0, 350]
    assert abs(rmse(mid, math.sqrt(g) * top / 2) - math.sqrt(1 - g)) < 0.3


def test_condition_on_levels_rejects_bad_input(schedule):
    with pytest.raises(ValueError, match="at least one known level"):
        sampling.condition_on_levels({}, schedule)
    with pytest.raises(ValueError, match="known level 2 is not a level index"):
        sampling.condition_on_levels({2: torch.zeros(1, 4, 4)}, schedule)
    with pytest.raises(ValueError, match="image tensor"):
        sampling.condition_on_levels({1: torch.zeros(4, 4)}, schedule)
    hook = sampling.condition_on_levels({1: torch.zeros(1, 5, 5)}, schedule)
    with pytest.raises(ValueError, match="known image for level 1 has shape"):
        hook([torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 4, 4)], 10)


def test_per_level_guidance_scales_reach_each_level():
    """A real class-conditional NestedUNet: level r of the guided output is u_r + w_r (c_r - u_r)."""
    config = tiny_config(num_classes=3)
    model = random_model(config)
    pyramid = [torch.randn(2, 1, 16, 16), torch.randn(2, 1, 8, 8)]
    t = torch.tensor([500, 500])
    labels, null = torch.tensor([0, 2]), torch.tensor([3, 3])
    with torch.no_grad():
        cond = model(pyramid, t, labels=labels)
        uncond = model(pyramid, t, labels=null)
        scales = [1.0, 4.0]
        guided = classifier_free_guidance(model, {"labels": labels}, {"labels": null}, scales)(pyramid, t)
    for level, w in enumerate(scales):
        assert not torch.allclose(cond[level], uncond[level])  # the label reaches this level
        torch.testing.assert_close(guided[level], uncond[level] + w * (cond[level] - uncond[level]),
                                   atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[0], cond[0], atol=1e-5, rtol=1e-5)  # scale 1 at the top: no guidance there
    # and through a whole sampling run, each level's scale changes only what it should at the first step
    seen = []
    for scales in ([1.0, 4.0], [1.0, 1.0], [4.0, 1.0]):
        guided_denoiser = classifier_free_guidance(model, {"labels": labels}, {"labels": null}, scales)
        states = []
        run_sampler(guided_denoiser, pyramid, PyramidSchedule.from_config(DiffusionConfig(), config.scales),
                            torch.tensor([500, 250]), method="dpmpp_2m", callback=states.append)
        seen.append(states[0].x0)
    # (scale 1 on a level computes u + 1 (c - u) in the batched path: equal to c up to rounding)
    assert torch.allclose(seen[0][0], seen[1][0], atol=1e-5) and not torch.allclose(seen[0][1], seen[1][1], atol=1e-3)
    assert torch.allclose(seen[2][1], seen[1][1], atol=1e-5) and not torch.allclose(seen[2][0], seen[1][0], atol=1e-3)


def test_generate_cli_init_image_pins_the_core_to_the_given_picture(tmp_path):
    """`matryoshka generate --init-image` (embedded model): the returned 16 px level is the given image."""
    from PIL import Image

    from matryoshka.cli import main
    from matryoshka.commands.generate import default_model_dir
    from matryoshka.data import pil_to_tensor
    from matryoshka.pipeline import MatryoshkaPipeline

    small = Image.new("L", (16, 16), 0)
    small.paste(255, (4, 4, 12, 12))
    small.save(tmp_path / "small.png")
    out = tmp_path / "up.png"
    assert main(["generate", "a bag", "--init-image", str(tmp_path / "small.png"), "--steps", "8", "--seed", "1",
                 "--all-levels", "--quiet", "--out", str(out)]) == 0
    core = pil_to_tensor(Image.open(tmp_path / "up.level1.png").convert("L"))
    torch.testing.assert_close(core, pil_to_tensor(small), atol=1 / 127, rtol=0)
    # The top level agrees with the pinned core: its 2x2 average pool is close to the given picture.
    pipe = MatryoshkaPipeline.from_pretrained(default_model_dir())
    result = pipe("a bag", num_inference_steps=8, generator=1, init_image=small, progress=False)
    pooled = torch.nn.functional.avg_pool2d(result.tensors[0], 2)
    free = pipe("a bag", num_inference_steps=8, generator=1, progress=False)
    target = pil_to_tensor(small)
    free_pooled = torch.nn.functional.avg_pool2d(free.tensors[0], 2)
    assert (pooled - target).square().mean() < (free_pooled - target).square().mean()
    with pytest.raises(ValueError, match="init_level"):
        pipe("a bag", num_inference_steps=2, init_image=small, init_level=5, progress=False)
