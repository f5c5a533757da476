"""The modern training objectives over the pyramid: sigmoid / soft-min-SNR weightings and flow matching.

The weightings are checked against their closed forms in the frame each paper states them in; the flow
objective (its x_t, its target, the samplers) against a Gaussian toy problem whose optimal velocity and
final distribution are known exactly.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from helpers import run_sampler
from matryoshka import pyramid as pyr
from matryoshka.diffusion import DiffusionConfig, PyramidSchedule
from matryoshka.losses import multi_resolution_loss
from matryoshka.schedule import flow_time, rectified_flow, shift, spaced_timesteps
from matryoshka.training.loop import diffusion_loss
from matryoshka.typed_config import ConfigError, from_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def random_batch(levels: int = 2, batch: int = 64, seed: int = 0, target: str = "eps", **diffusion):
    """A 2-level pyramid batch with random predictions, and its config and schedule."""
    config = DiffusionConfig(loss_target=target, **diffusion)
    scales = [2**i for i in reversed(range(levels))]
    schedule = PyramidSchedule.from_config(config, scales)
    g = torch.Generator().manual_seed(seed)
    clean = [torch.rand(batch, 1, 4 * s, 4 * s, generator=g) * 2 - 1 for s in scales]
    noise = [torch.randn(x.shape, generator=g) for x in clean]
    t = torch.randint(0, 1000, (batch,), generator=g)
    gammas = schedule.at(t + 1)
    noisy = [pyr.add_noise(x, e, gr) for x, e, gr in zip(clean, noise, gammas, strict=True)]
    predictions = [torch.randn(x.shape, generator=g) for x in clean]
    return config, schedule, clean, noise, noisy, t, predictions


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).double().pow(2).flatten(1).mean(1)


@pytest.mark.parametrize("target", ["eps", "v", "x0", "flow"])
@pytest.mark.parametrize("bias", [2.0, -1.0])
def test_sigmoid_weighting_is_sigmoid_of_bias_minus_log_snr_on_the_eps_error(target: str, bias: float):
    """Whatever the loss target, the sigmoid-weighted loss is sigmoid(b - lambda) * MSE_eps (Kingma & Gao)."""
    config, schedule, clean, noise, noisy, t, predictions = random_batch(
        target=target, loss_weighting="sigmoid", sigmoid_bias=bias
    )
    loss = multi_resolution_loss(predictions, clean, noise, noisy, t, schedule, config)
    for r in range(2):
        g = schedule.at(t + 1, dtype=torch.float64)[r]
        lam = torch.log(g / (1 - g))
        eps_hat = pyr.convert(noisy[r], predictions[r], g.float(), config.prediction, "eps")
        expected = torch.sigmoid(bias - lam) * mse(eps_hat, noise[r])
        torch.testing.assert_close(loss.per_level[r].double(), expected, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("gamma_value", [1.0, 4.0])
def test_soft_min_snr_is_k_diffusions_weighting_on_its_preconditioned_target(gamma_value: float):
    """k-diffusion: (sigma sd)^2 / (sigma^2 + sd^2)^2 * MSE(F), F the EDM-preconditioned target, VE sigma^2 =
    1 / SNR; with sd = 1 / sqrt(gamma) that is our x0-frame loss."""
    config, schedule, clean, noise, noisy, t, predictions = random_batch(
        target="x0", loss_weighting="soft_min_snr", min_snr_gamma=gamma_value
    )
    loss = multi_resolution_loss(predictions, clean, noise, noisy, t, schedule, config)
    sd = 1 / math.sqrt(gamma_value)
    for r in range(2):
        g = schedule.at(t + 1, dtype=torch.float64)[r]
        sigma = ((1 - g) / g).sqrt()
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        x0_hat = pyr.to_x0(noisy[r], predictions[r], g.float(), config.prediction)
        mse_f = mse(x0_hat, clean[r]) / c_out**2  # D = c_skip y + c_out F: the F error is the x0 error / c_out
        expected = (sigma * sd) ** 2 / (sigma**2 + sd**2) ** 2 * mse_f
        torch.testing.assert_close(loss.per_level[r].double(), expected, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("target", ["eps", "v", "x0"])
def test_min_snr_keeps_its_published_form_per_target(target: str):
    """min(SNR, gamma) / SNR on eps, min(SNR, gamma) / (SNR + 1) on v, min(SNR, gamma) on x0."""
    config, schedule, clean, noise, noisy, t, predictions = random_batch(target=target, loss_weighting="min_snr")
    plain = multi_resolution_loss(predictions, clean, noise, noisy, t, schedule, dataclasses.replace(
        config, loss_weighting="none"))
    weighted = multi_resolution_loss(predictions, clean, noise, noisy, t, schedule, config)
    g = schedule.at(t + 1, dtype=torch.float64)[0]
    snr = g / (1 - g)
    clipped = snr.clamp(max=5.0)
    expected = {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[target]
    torch.testing.assert_close(weighted.per_level[0].double(), plain.per_level[0].double() * expected, rtol=2e-4,
                               atol=1e-7)


def test_weighting_per_level_and_its_validation():
    config, schedule, clean, noise, noisy, t, predictions = random_batch(
        loss_weighting=["sigmoid", "none"], sigmoid_bias=[0.5, 3.0]
    )
    loss = multi_resolution_loss(predictions, clean, noise, noisy, t, schedule, config)
    g = schedule.at(t + 1, dtype=torch.float64)
    plain = multi_resolution_loss(predictions, clean, noise, noisy, t, schedule, dataclasses.replace(
        config, loss_weighting="none"))
    torch.testing.assert_close(loss.per_level[1], plain.per_level[1])
    lam = torch.log(g[0] / (1 - g[0]))
    torch.testing.assert_close(loss.per_level[0].double(), torch.sigmoid(0.5 - lam) * plain.per_level[0].double(),
                               rtol=2e-4, atol=1e-7)
    with pytest.raises(ConfigError, match="loss_weighting"):
        from_dict(DiffusionConfig, {"loss_weighting": ["sigmoid", "bad"]})
    with pytest.raises(ConfigError, match="loss_weighting: has 3 entries but the model has 2 levels"):
        from_dict(DiffusionConfig, {"loss_weighting": ["none"] * 3}).check_levels(2)


def test_a_stage_takes_the_innermost_per_level_weightings():
    from matryoshka.training.config import StageConfig
    from matryoshka.training.stages import stage_diffusion

    config = DiffusionConfig(loss_weighting=["sigmoid", "soft_min_snr", "none"], sigmoid_bias=[1.0, 2.0, 3.0])
    core = stage_diffusion(config, StageConfig(levels=1, steps=1))
    assert core.loss_weighting == ["none"] and core.sigmoid_bias == [3.0]
    assert stage_diffusion(DiffusionConfig(loss_weighting="sigmoid"), StageConfig(levels=2, steps=1)).loss_weighting \
        == "sigmoid"


# ------------------------------------------------------------------------------------------------
# Flow matching on a Gaussian toy: x0 ~ N(m, s^2) per pixel, so every level is Gaussian and the optimal
# velocity E[eps - x0 | x_f] is linear in the flow state x_f = (1 - t) x0 + t eps.

MEAN, STD = 0.2, 0.3


def optimal_velocity(x_flow: torch.Tensor, t: torch.Tensor, std: float) -> torch.Tensor:
    t = pyr._expand(t, x_flow)
    variance = (1 - t) ** 2 * std**2 + t**2
    centred = x_flow - (1 - t) * MEAN
    e_eps = t / variance * centred
    e_x0 = MEAN + (1 - t) * std**2 / variance * centred
    return e_eps - e_x0


class ExactFlowModel(torch.nn.Module):
    """Predicts the exact velocity of every level from its flow input and its shifted flow time, and
    records what it was given."""

    def __init__(self, schedule: PyramidSchedule) -> None:
        super().__init__()
        self.schedule = schedule
        self.inputs: list[list[torch.Tensor]] = []

    def forward(self, pyramid, t, **_):
        self.inputs.append(pyramid)
        out = []
        for r, x in enumerate(pyramid):
            index = t.double() + 1  # the network gets t - 1 for the state at index t
            values, where = index.unique(return_inverse=True)
            gamma = torch.tensor([self.schedule.gammas_at(float(i))[r] for i in values],
                                 dtype=torch.float64)[where]
            out.append(optimal_velocity(x, flow_time(gamma).to(x.dtype), STD / 2**r))
        return out


def flow_config(**changes) -> DiffusionConfig:
    return DiffusionConfig(schedule="rectified_flow", prediction="flow", loss_target="flow", threshold="none",
                           **changes)


def test_rectified_flow_schedule_and_its_per_level_shift_are_the_time_map():
    """SNR(t) = ((1 - t) / t)^2 at t = i / T; the SNR shift by s^p is t_r = k t / (1 + (k - 1) t), k = s^(p/2)."""
    table = rectified_flow(1000)
    t = torch.arange(1, 1000, dtype=torch.float64) / 1000
    torch.testing.assert_close(table[1:1000] / (1 - table[1:1000]), ((1 - t) / t) ** 2)
    assert table[0] == 1 and 0 < table[1000] <= 1e-8
    for scale, power in ((2, 1.0), (4, 2.0)):
        k = scale ** (power / 2)
        torch.testing.assert_close(flow_time(shift(table, scale, power))[1:1000], k * t / (1 + (k - 1) * t))


def test_flow_objective_gives_the_network_the_flow_state_and_regresses_the_velocity():
    config = flow_config(shift_power=1.0)
    schedule = PyramidSchedule.from_config(config, [2, 1])
    model = ExactFlowModel(schedule)
    g = torch.Generator().manual_seed(0)
    batch = 20000
    images = MEAN + STD * torch.randn(batch, 1, 4, 4, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    noise = [torch.randn(batch, 1, 4, 4, generator=g), torch.randn(batch, 1, 2, 2, generator=g)]
    loss = diffusion_loss(model, images, [2, 1], t, noise, {}, schedule, config)

    clean = pyr.build_pyramid(images, [2, 1])
    for r in range(2):
        t_r = flow_time(schedule.at(t + 1, dtype=torch.float64)[r]).float()
        expected_input = pyr._expand(1 - t_r, clean[r]) * clean[r] + pyr._expand(t_r, clean[r]) * noise[r]
        torch.testing.assert_close(model.inputs[0][r], expected_input, rtol=1e-4, atol=1e-4)
        # At the exact velocity the loss is the conditional variance of eps - x0 given x_f, per pixel:
        # Var(eps - x0) - Cov(eps - x0, x_f)^2 / Var(x_f).
        std = STD / 2**r
        variance = (1 - t_r) ** 2 * std**2 + t_r**2
        residual = (1 + std**2) - (t_r - (1 - t_r) * std**2) ** 2 / variance
        standard_error = loss.per_level[r].std().item() / batch**0.5
        assert abs(loss.per_level[r].mean().item() - residual.mean().item()) < 4 * standard_error


@pytest.mark.parametrize("method", ["ddim", "euler", "heun", "dpmpp_2m"])
def test_samplers_take_the_exact_flow_to_the_data_distribution(method: str):
    config = flow_config(shift_power=1.0)
    schedule = PyramidSchedule.from_config(config, [2, 1])
    model = ExactFlowModel(schedule)
    g = torch.Generator().manual_seed(1)
    noise = [torch.randn(2000, 1, 4, 4, generator=g), torch.randn(2000, 1, 2, 2, generator=g)]
    # First-order methods need more steps for 2% on the spread: the Gaussian's flow path bends near t = s^2.
    timesteps = spaced_timesteps(1000, {"ddim": 200, "euler": 200, "heun": 25, "dpmpp_2m": 50}[method])
    out = run_sampler(model, noise, schedule, timesteps, method=method, prediction="flow",
                              threshold_kind="none")
    for r, x in enumerate(out):
        assert abs(x.mean().item() - MEAN) < 0.01
        assert abs(x.std().item() - STD / 2**r) < 0.02 * STD / 2**r


def test_flow_euler_in_flow_time_is_ddim():
    """x_s = x_t + (t_s - t) u in flow coordinates is, step for step, the DDIM update of the VP state."""
    config = flow_config(shift_power=1.0)
    schedule = PyramidSchedule.from_config(config, [2, 1])
    model = ExactFlowModel(schedule)
    g = torch.Generator().manual_seed(2)
    x_t = [torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 2, 2, generator=g)]
    t_index, s_index = 700, 600
    gam_t, gam_s = schedule.at(torch.tensor([t_index])), schedule.at(torch.tensor([s_index]))
    ddim = run_sampler(model, x_t, schedule, torch.tensor([t_index, s_index]), prediction="flow",
                           threshold_kind="none")
    velocity = model([pyr.model_input(x, gm, "flow") for x, gm in zip(x_t, gam_t, strict=True)],
                     torch.tensor([t_index - 1] * 8))
    for r in range(2):
        x_flow, tt = pyr.model_input(x_t[r], gam_t[r], "flow"), flow_time(gam_t[r].double()).float()
        ts = flow_time(gam_s[r].double()).float()
        euler_flow = x_flow + (ts - tt) * velocity[r]
        a, b = gam_s[r].sqrt(), (1 - gam_s[r]).sqrt()
        torch.testing.assert_close(ddim[r], (euler_flow * (a + b)).clip(-1, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weighting", ["sigmoid", "soft_min_snr"])
def test_weighted_and_flow_models_train_and_sample_through_the_pipeline(tmp_path, weighting: str):
    from matryoshka.pipeline import MatryoshkaPipeline
    from matryoshka.training import train
    from matryoshka.training.testing import tiny_config

    flow = ["mdm.diffusion.schedule=rectified_flow", "mdm.diffusion.prediction=flow", "mdm.diffusion.loss_target=flow"]
    result = train(tiny_config([*flow, f"mdm.diffusion.loss_weighting={weighting}"]), tmp_path / "run")
    assert all(math.isfinite(v) for k, v in result.losses.items() if k.startswith("loss"))
    pipe = MatryoshkaPipeline.from_pretrained(result.model_dir)
    assert pipe.config.diffusion.prediction == "flow"
    for sampler in ("ddim", "heun"):
        out = pipe(class_labels=[1, 2], num_inference_steps=3, guidance_scale=2.0, sampler=sampler, generator=0,
                   progress=False)
        assert torch.isfinite(out.tensors[0]).all() and out.tensors[0].shape == (2, 1, 16, 16)


# ------------------------------------------------------------------------------------------------
# Automatic progressive stages


def plateau_config(extra: list[str] | None = None):
    from matryoshka.training.testing import tiny_config

    # Stage 1 may run 12 steps but ends once 2 measurements in a row fail to improve by 50%.
    return tiny_config([
        "stages=[{levels: 1, steps: 12, end_on_plateau: {every: 1, patience: 2, min_delta: 0.5, batch_size: 16}},"
        " {levels: 2, steps: 3}]", *(extra or []),
    ])


def test_plateau_tracker_decides_from_its_history():
    from matryoshka.training.config import PlateauConfig
    from matryoshka.training.plateau import PlateauTracker

    tracker = PlateauTracker(PlateauConfig(every=10, patience=2, min_delta=0.1, min_steps=40))
    assert not tracker.due(0) and tracker.due(10) and not tracker.due(15)
    decisions = [tracker.update(step, value) for step, value in ((10, 1.0), (20, 0.8), (30, 0.79), (40, 0.75))]
    assert decisions == [False, False, False, True]  # 0.79 and 0.75 are not 10% below 0.8
    again = PlateauTracker.from_dict(tracker.config, tracker.to_dict())
    assert again == tracker


def test_a_stage_ends_on_its_plateau_and_the_next_starts_there(tmp_path):
    import json

    from matryoshka.training import read_metrics, train

    result = train(plateau_config(), tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    measured = [r for r in records if "held_out_loss" in r]
    end = measured[-1]["step"]
    assert 2 <= end < 12 and len(measured) == end  # measured every step, stopped early
    assert result.step == end + 3 and result.stage == 1
    assert [r["stage"] for r in records if "loss" in r] == [0] * end + [1] * 3
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob(f"step-{result.step:07d}")).joinpath(
        "state.json").read_text())
    assert state["stage_ends"] == {"0": end}


def test_a_run_with_an_automatic_stage_resumes_bit_exactly(tmp_path):
    from matryoshka.training import train

    whole = train(plateau_config(), tmp_path / "whole")
    end = whole.step - 3
    for cut in (1, end, end + 1):  # inside the automatic stage, where it ended, inside the next stage
        run = tmp_path / f"cut{cut}"
        train(plateau_config(), run, max_steps=cut)
        resumed = train(plateau_config(), run, resume=True)
        assert resumed.step == whole.step
        for key, value in whole.ema_model.state_dict().items():
            assert torch.equal(value, resumed.ema_model.state_dict()[key]), (cut, key)


def test_an_automatic_stage_needs_held_out_items(tmp_path):
    from matryoshka.training import train

    with pytest.raises(ConfigError, match="end_on_plateau"):
        train(plateau_config(["data.dataset=shards", "data.path=x.tar"]), tmp_path / "run")


def budget_config(budget_tflops: float, extra: list[str] | None = None):
    # The last stage may run 1000 steps; the budget ends it much sooner.
    return plateau_config([f"budget_tflops={budget_tflops!r}", "stages.1.steps=1000", *(extra or [])])


def stage_step_flops() -> list[float]:
    from matryoshka.training.flops import training_step_flops

    config = plateau_config()
    return [training_step_flops(config, i) for i in range(2)]


def test_a_budget_sizes_the_last_stage_from_what_the_earlier_ones_ran():
    config = budget_config(1.0)  # 1 TFLOP
    flops = [1e9, 4e9]
    assert config.stage_bounds({}, flops) == [0, 12, 12 + round((1e12 - 12e9) / 4e9)]
    assert config.stage_bounds({0: 5}, flops) == [0, 5, 5 + round((1e12 - 5e9) / 4e9)]  # the plateau's leftover
    assert budget_config(100.0).stage_bounds({}, flops) == [0, 12, 1012]  # capped by the stage's steps
    assert budget_config(1.0).stage_bounds({0: 5, 1: 7}, flops) == [0, 5, 12]  # the last stage ended on its own
    with pytest.raises(ConfigError, match="budget_tflops"):
        budget_config(0.01).stage_bounds({}, flops)  # 10 GFLOP < 12 steps x 1 GFLOP
    with pytest.raises(ValueError, match="FLOPs"):
        config.stage_bounds({})
    with pytest.raises(ConfigError, match="budget_tflops"):
        budget_config(-1.0)


def test_a_budgeted_run_spends_its_budget_after_an_automatic_stage(tmp_path):
    from matryoshka.training import read_metrics, train
    from matryoshka.training.optim import learning_rate

    flops = stage_step_flops()
    budget = 12 * flops[0] + 3 * flops[1]  # 3 steps of the last stage had the first run all its 12
    result = train(budget_config(budget / 1e12), tmp_path / "run")
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    end = sum(1 for r in records if r["stage"] == 0)
    assert 2 <= end < 12  # the automatic stage ended early ...
    last = result.step - end  # ... and the last stage took the compute it left
    assert last == round((budget - end * flops[0]) / flops[1]) > 3
    assert abs(end * flops[0] + last * flops[1] - budget) <= flops[1] / 2
    config = budget_config(budget / 1e12)
    lrs = [r["lr"] for r in records if r["stage"] == 1]  # the last stage's schedule spans its actual length
    expected = [learning_rate(i, last, config.optim.lr, config.optim.warmup_steps, config.optim.schedule,
                              config.optim.min_lr_ratio) for i in range(last)]
    assert lrs == pytest.approx(expected)


def test_a_budgeted_run_resumes_bit_exactly(tmp_path):
    from matryoshka.training import train

    budget = sum(n * f for n, f in zip((12, 3), stage_step_flops(), strict=True)) / 1e12
    whole = train(budget_config(budget), tmp_path / "whole")
    for cut in (1, whole.step - 2):  # inside the automatic stage, inside the budgeted last stage
        run = tmp_path / f"cut{cut}"
        train(budget_config(budget), run, max_steps=cut)
        resumed = train(budget_config(budget), run, resume=True)
        assert resumed.step == whole.step
        for key, value in whole.ema_model.state_dict().items():
            assert torch.equal(value, resumed.ema_model.state_dict()[key]), (cut, key)


def test_a_budget_the_earlier_stages_exceed_is_refused_before_anything_is_written(tmp_path):
    from matryoshka.training import train

    with pytest.raises(ConfigError, match="budget_tflops.*do not cover the earlier stages"):
        train(budget_config(1e-6), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_stage_may_keep_its_learning_rate_constant_under_a_cosine_run(tmp_path):
    from matryoshka.training import read_metrics, train
    from matryoshka.training.optim import learning_rate
    from matryoshka.training.testing import tiny_config

    config = tiny_config([
        "optim.schedule=cosine", "optim.warmup_steps=1", "optim.min_lr_ratio=0.1",
        "stages=[{levels: 1, steps: 5, lr_schedule: constant}, {levels: 2, steps: 5}]",
    ])
    train(config, tmp_path / "run")
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    lr = config.optim.lr
    core = [r["lr"] for r in records if r["stage"] == 0]
    nested = [r["lr"] for r in records if r["stage"] == 1]
    assert core == pytest.approx([lr] * 5)  # warm-up of one step, then constant
    assert nested == pytest.approx([learning_rate(i, 5, lr, 1, "cosine", 0.1) for i in range(5)])
    assert nested[-1] < 0.5 * lr


def test_a_stage_learning_rate_schedule_is_validated():
    from matryoshka.training.testing import tiny_config

    with pytest.raises(ConfigError, match=r"stages\[0\]\.lr_schedule"):
        tiny_config(["stages=[{levels: 1, steps: 5, lr_schedule: linear}]"])
