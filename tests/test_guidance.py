"""Guidance over the pyramid: interval per level, rescale, autoguidance, network evaluations counted."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import run_sampler
from matryoshka.diffusion import DiffusionConfig, PyramidSchedule
from matryoshka.guidance import GuidanceInterval, GuidedDenoiser, parse_intervals
from matryoshka.model_dir import MDMConfig
from matryoshka.models import LevelConfig, ModelConfig, NestedUNet
from matryoshka.pipeline import MatryoshkaPipeline
from matryoshka.schedule import spaced_timesteps

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
SCHEDULE = PyramidSchedule.from_config(DiffusionConfig(), [2, 1])


def labelled_model(pyramid, t, labels=None):
    """A toy network: its output depends on the label (the null label 10 gives the unconditional one)."""
    shift = labels.float().view(-1, *([1] * (pyramid[0].ndim - 1))) / 10
    return [torch.tanh(x) * (1 + shift) + 0.1 * shift for x in pyramid]


def run(denoiser, steps: int = 8):
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 4, 4, generator=g)]
    return run_sampler(denoiser, noise, SCHEDULE, spaced_timesteps(1000, steps))


COND, UNCOND = {"labels": torch.tensor([1, 2, 3])}, {"labels": torch.full((3,), 10)}


def test_an_interval_that_covers_every_step_is_plain_guidance():
    plain = run(GuidedDenoiser(labelled_model, COND, UNCOND, 3.0))
    for interval in (GuidanceInterval(0.0, math.inf), GuidanceInterval(-math.inf, math.inf, "logsnr"),
                     GuidanceInterval(0, 1000, "t")):
        covered = run(GuidedDenoiser(labelled_model, COND, UNCOND, 3.0, interval=interval, schedule=SCHEDULE))
        for a, b in zip(plain, covered, strict=True):
            assert torch.equal(a, b)


def test_outside_the_interval_only_the_conditional_rows_run():
    guided = GuidedDenoiser(labelled_model, COND, UNCOND, 3.0, interval=GuidanceInterval(2000, 3000, "t"))
    unguided = run(GuidedDenoiser(labelled_model, COND, UNCOND, 1.0))
    for a, b in zip(run(guided), unguided, strict=True):
        assert torch.equal(a, b)
    assert guided.rows == 8 * 3  # one row per sample and step
    everywhere = GuidedDenoiser(labelled_model, COND, UNCOND, 3.0)
    run(everywhere)
    assert everywhere.rows == 2 * 8 * 3


def test_the_interval_is_each_levels_own_shifted_noise_level():
    """With sigma in (1, inf) the 16 px level (SNR / 2) is guided at steps where the 8 px core is not."""
    guided = GuidedDenoiser(labelled_model, COND, UNCOND, 3.0, interval=GuidanceInterval(1.0, math.inf),
                            schedule=SCHEDULE)
    mixed = []
    for t in range(1, 1001, 7):
        g = SCHEDULE.gammas_at(t)
        sigmas = [math.sqrt((1 - x) / x) for x in g]
        levels = guided.guided_levels(2, torch.tensor([t - 1]))
        assert levels == [s >= 1.0 for s in sigmas]
        mixed.append(levels == [True, False])
    assert any(mixed)
    per_level = GuidedDenoiser(labelled_model, COND, UNCOND, 3.0, interval=[None, GuidanceInterval(0, 0, "t")],
                               schedule=SCHEDULE)
    assert per_level.guided_levels(2, torch.tensor([499])) == [True, False]


def test_rescale_matches_the_conditional_spread_and_zero_is_off():
    pyramid = [torch.randn(3, 1, 8, 8), torch.randn(3, 1, 4, 4)]
    t = torch.full((3,), 500)
    plain = GuidedDenoiser(labelled_model, COND, UNCOND, 4.0)(pyramid, t)
    off = GuidedDenoiser(labelled_model, COND, UNCOND, 4.0, rescale=0.0)(pyramid, t)
    full = GuidedDenoiser(labelled_model, COND, UNCOND, 4.0, rescale=1.0)(pyramid, t)
    half = GuidedDenoiser(labelled_model, COND, UNCOND, 4.0, rescale=0.5)(pyramid, t)
    cond = labelled_model(pyramid, t, **COND)
    for r in range(2):
        assert torch.equal(plain[r], off[r])
        torch.testing.assert_close(full[r].std(dim=(1, 2, 3)), cond[r].std(dim=(1, 2, 3)))
        torch.testing.assert_close(half[r], 0.5 * full[r] + 0.5 * plain[r])
    with pytest.raises(ValueError, match="guidance_rescale"):
        GuidedDenoiser(labelled_model, COND, UNCOND, 4.0, rescale=1.5)


def test_autoguidance_pushes_away_from_the_weaker_model():
    def weak(pyramid, t, labels=None):
        return [0.5 * x for x in labelled_model(pyramid, t, labels)]

    pyramid = [torch.randn(3, 1, 8, 8), torch.randn(3, 1, 4, 4)]
    t = torch.full((3,), 300)
    guided = GuidedDenoiser(labelled_model, COND, None, [2.0, 3.0], guide_model=weak)
    out = guided(pyramid, t)
    cond, base = labelled_model(pyramid, t, **COND), weak(pyramid, t, **COND)
    for r, w in enumerate((2.0, 3.0)):
        torch.testing.assert_close(out[r], base[r] + w * (cond[r] - base[r]))
    assert guided.rows == 3 and guided.guide_rows == 3
    itself = GuidedDenoiser(labelled_model, COND, None, 5.0, guide_model=labelled_model)(pyramid, t)
    for a, b in zip(itself, cond, strict=True):
        torch.testing.assert_close(a, b)


def test_parse_intervals():
    assert parse_intervals("0.3,5", "sigma", 2) == GuidanceInterval(0.3, 5.0)
    assert parse_intervals("always;1,2", "logsnr", 2) == [None, GuidanceInterval(1.0, 2.0, "logsnr")]
    with pytest.raises(ValueError, match="one per level"):
        parse_intervals("1,2;3,4;5,6", "t", 2)
    with pytest.raises(ValueError, match="low <= high"):
        GuidanceInterval(3.0, 1.0)


def tiny_pipeline(seed: int) -> MatryoshkaPipeline:
    torch.manual_seed(seed)
    levels = [LevelConfig(channels=[8, 8], num_res_blocks=[1, 1], norm_groups=4, temb_dim=32),
              LevelConfig(channels=[8, 16], num_res_blocks=[1, 1], norm_groups=4, temb_dim=32)]
    model = NestedUNet(ModelConfig(image_size=16, in_channels=1, num_classes=3, levels=levels))
    for p in model.parameters():  # zero-initialised outputs would make every model the same
        p.data.add_(0.05 * torch.randn_like(p))
    return MatryoshkaPipeline(model, MDMConfig(model=model.config, diffusion=DiffusionConfig()))


def test_pipeline_takes_the_interval_rescale_and_a_guide_and_counts_evaluations():
    pipe, weak = tiny_pipeline(0), tiny_pipeline(1)
    options = {"class_labels": [0, 1], "num_inference_steps": 4, "guidance_scale": 3.0, "generator": 0,
               "progress": False}
    plain = pipe(**options)
    assert plain.evaluations == {"network_rows": 2 * 4 * 2, "guide_rows": 0}
    covered = pipe(**options, guidance_interval=(0.0, math.inf))
    assert torch.equal(plain.tensors[0], covered.tensors[0])
    never = pipe(**options, guidance_interval=GuidanceInterval(5000, 6000, "t"))
    assert never.evaluations["network_rows"] == 4 * 2
    assert torch.equal(never.tensors[0], pipe(**{**options, "guidance_scale": 1.0}).tensors[0])
    rescaled = pipe(**options, guidance_rescale=0.7)
    assert not torch.equal(rescaled.tensors[0], plain.tensors[0])
    auto = pipe(**options, guide_model=weak)
    assert auto.evaluations == {"network_rows": 4 * 2, "guide_rows": 4 * 2}
    assert not torch.equal(auto.tensors[0], plain.tensors[0])
    other = tiny_pipeline(2)
    other.config.model.num_classes = 5
    with pytest.raises(ValueError, match="num_classes"):
        pipe(**options, guide_model=other)


def test_generate_flags_reach_the_pipeline(tmp_path, monkeypatch, capsys):
    from matryoshka import cli
    from matryoshka.model_dir import save_model_dir

    strong, weak = tiny_pipeline(0), tiny_pipeline(1)
    save_model_dir(tmp_path / "strong", strong.model, strong.config)
    save_model_dir(tmp_path / "weak", weak.model, weak.config)
    seen = {}
    call = MatryoshkaPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(MatryoshkaPipeline, "__call__", spy)
    base = ["generate", "--model", str(tmp_path / "strong"), "--class", "1", "--steps", "2", "--seed", "0", "--quiet"]
    argv = [*base, "--guidance-interval", "always;0.5,20", "--guidance-rescale", "0.5", "--guide-model",
            str(tmp_path / "weak"), "--out", str(tmp_path / "a.png")]
    assert cli.main(argv) == 0
    assert seen["guidance_interval"] == [None, GuidanceInterval(0.5, 20.0, "sigma")]
    assert seen["guidance_rescale"] == 0.5 and isinstance(seen["guide_model"], MatryoshkaPipeline)
    for bad, message in ((["--guidance-interval", "3"], "an interval is LO,HI"),
                         (["--guidance-interval", "3,1"], "low <= high"),
                         (["--guidance-rescale", "2"], "--guidance-rescale must be in")):
        assert cli.main([*base, *bad, "--out", str(tmp_path / "b.png")]) == 2
        assert message in capsys.readouterr().err


def test_demo_requests_carry_the_guidance_options():
    from matryoshka.demo import DemoLimits, DemoRequestError, generate_request

    pipe, weak = tiny_pipeline(0), tiny_pipeline(1)
    limits = DemoLimits()
    base = {"prompt": "1", "steps": 3, "guidance": 3.0, "seed": 0, "num_images": 1}
    plain, _ = generate_request(pipe, base, limits)
    covered, info = generate_request(pipe, {**base, "guidance_interval": "0,1e9"}, limits)
    assert "sigma [0, 1e+09]" in info
    assert [i.tobytes() for i in plain[0]] == [i.tobytes() for i in covered[0]]
    auto, info = generate_request(pipe, {**base, "autoguidance": True, "guidance_rescale": 0.5}, limits, guide=weak)
    assert "autoguidance" in info and "rescale 0.5" in info
    for bad, message in (({"autoguidance": True}, "needs a guide model"),
                         ({"guidance_interval": "5"}, "guidance interval '5'"),
                         ({"guidance_rescale": 3}, "guidance rescale must be a finite number between 0 and 1"),
                         ({"colour": 1}, "unknown request field 'colour'")):
        with pytest.raises(DemoRequestError, match=message):
            generate_request(pipe, {**base, **bad}, limits)
