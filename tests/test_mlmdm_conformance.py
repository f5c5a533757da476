"""Conformance with Apple's ml-mdm, on tensors its own code computed (../shared/fixtures/ml-mdm).

Every folder in $MLMDM_FIXTURES (os.pathsep-separated; default: every folder under
../shared/fixtures/ml-mdm) is checked: the checkpoint loads through our safe loader with the folder's
config.yaml, and the forward pass, the shifted schedules, every step of the DDIM + guidance trajectory
and the training loss match. Everything about a fixture (levels, sizes, scales, shift, threshold,
guidance, steps, masks) is read from its files, never from constants here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_sampler
from matryoshka import losses, sampling
from matryoshka import pyramid as pyr
from matryoshka.diffusion import PyramidSchedule
from matryoshka.guidance import classifier_free_guidance
from matryoshka.interop import load_official
from matryoshka.schedule import spaced_timesteps

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "ml-mdm"
SCHEDULE_RTOL = 1e-5
TENSOR_ATOL = 1e-4


def fixture_dirs() -> list[Path]:
    listed = os.environ.get("MLMDM_FIXTURES")
    if listed:
        return [Path(p) for p in listed.split(os.pathsep) if p]
    if not SHARED.is_dir():
        return []
    return sorted(p for p in SHARED.iterdir() if (p / "vis_model.pth").is_file())


FIXTURES = fixture_dirs()
if not FIXTURES:
    pytestmark = pytest.mark.skip(
        reason=f"no ml-mdm fixtures: {SHARED} is absent and MLMDM_FIXTURES is unset "
        "(the fixtures live beside the repository, in the project's shared folder)"
    )


@pytest.fixture(scope="module", params=FIXTURES, ids=[p.name for p in FIXTURES])
def fixture(request):
    folder: Path = request.param
    meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
    model, model_config, diffusion_config = load_official(folder / "vis_model.pth", folder / "config.yaml")
    schedule = PyramidSchedule.from_config(diffusion_config, model_config.scales)
    return folder, meta, model, model_config, diffusion_config, schedule


def _levels(tensors: dict, prefix: str) -> list[torch.Tensor]:
    count = sum(1 for k in tensors if k.startswith(prefix) and k[len(prefix):].isdigit())
    return [tensors[f"{prefix}{i}"] for i in range(count)]


def _optional(tensors: dict, key: str):
    return tensors.get(key)


def test_config_agrees_with_meta(fixture):
    folder, meta, model, model_config, diffusion_config, _ = fixture
    if "sizes" in meta:
        assert model_config.sizes == meta["sizes"]
    if "scales" in meta:
        assert model_config.scales == meta["scales"]
    if "shift_power" in meta:
        assert diffusion_config.shift_power == pytest.approx(meta["shift_power"])
    if "threshold" in meta:
        assert diffusion_config.threshold == meta["threshold"].lower()
    if "params" in meta:
        assert sum(p.numel() for p in model.parameters()) == meta["params"]


def test_forward(fixture):
    folder, _, model, model_config, _, _ = fixture
    tensors = load_file(folder / "forward.safetensors")
    inputs = _levels(tensors, "x_")
    expected = _levels(tensors, "out_")
    assert len(inputs) == model_config.num_levels
    with torch.no_grad():
        outputs = model(inputs, tensors["t"], _optional(tensors, "lm_outputs"), _optional(tensors, "lm_mask"))
    for level, (ours, theirs) in enumerate(zip(outputs, expected, strict=True)):
        torch.testing.assert_close(ours, theirs, atol=TENSOR_ATOL, rtol=0, msg=f"level {level}")


def test_schedule(fixture):
    folder, _, _, _, diffusion_config, schedule = fixture
    tensors = load_file(folder / "schedule.safetensors")
    expected = _levels(tensors, "gamma_")
    assert len(expected) == schedule.num_levels
    for level, theirs in enumerate(expected):
        torch.testing.assert_close(
            schedule.gammas[level].to(theirs.dtype), theirs, rtol=SCHEDULE_RTOL, atol=0, msg=f"level {level}"
        )
    for key, value in tensors.items():
        if key.startswith("timesteps_"):
            steps = int(key.split("_")[1])
            assert torch.equal(spaced_timesteps(diffusion_config.num_train_steps, steps), value.long())


def test_sampler_trajectory(fixture):
    folder, meta, model, model_config, diffusion_config, schedule = fixture
    tensors = load_file(folder / "sample.safetensors")
    noise = _levels(tensors, "noise_")
    batch = noise[-1].shape[0]
    text, mask = _optional(tensors, "lm_outputs"), _optional(tensors, "lm_mask")
    guidance = float(meta.get("guidance_scale", 1.0))
    if text is not None and text.shape[0] == 2 * batch:  # unconditional rows first
        uncond = {"text_states": text[:batch], "text_mask": None if mask is None else mask[:batch]}
        cond = {"text_states": text[batch:], "text_mask": None if mask is None else mask[batch:]}
    else:
        uncond = cond = {"text_states": text, "text_mask": mask}
    denoiser = classifier_free_guidance(model, cond, uncond, guidance)
    timesteps = tensors["timesteps"].long()
    eta = float(meta.get("ddim_eta", 0.0))
    checked = []

    def check(state: sampling.StepState) -> None:
        for level in range(model_config.num_levels):
            for name, ours in (("x0", state.x0[level]), ("xt", state.xt[level])):
                key = f"step{state.index}_{name}_{level}"
                if key in tensors:
                    torch.testing.assert_close(ours, tensors[key], atol=TENSOR_ATOL, rtol=0, msg=key)
                    checked.append(key)

    run_sampler(
        denoiser, noise, schedule, timesteps, method="ddim", eta=eta,
        prediction=diffusion_config.prediction, threshold_kind=diffusion_config.threshold, callback=check,
    )
    expected_keys = [k for k in tensors if k.startswith("step")]
    assert sorted(checked) == sorted(expected_keys)
    assert len(timesteps) - 1 == sum(1 for k in expected_keys if k.endswith("_xt_0"))


def test_training_loss(fixture):
    folder, _, model, model_config, diffusion_config, schedule = fixture
    path = folder / "loss.safetensors"
    if not path.is_file():
        pytest.skip(f"{folder.name} has no loss.safetensors")
    tensors = load_file(path)
    t = tensors["time"].long()
    clean = pyr.build_pyramid(tensors["images"], model_config.scales)
    clean = schedule.scale_signal(clean)
    noise = _levels(tensors, "eps_")
    gammas = schedule.at(t + 1)
    noisy = [pyr.add_noise(x, e, g) for x, e, g in zip(clean, noise, gammas, strict=True)]
    with torch.no_grad():
        predictions = model(noisy, t, _optional(tensors, "lm_outputs"), _optional(tensors, "lm_mask"))
    loss = losses.multi_resolution_loss(predictions, clean, noise, noisy, t, schedule, diffusion_config)
    meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
    if "loss_weights" in meta:
        assert diffusion_config.level_weights == pytest.approx(meta["loss_weights"])
    torch.testing.assert_close(loss.total, tensors["loss"], atol=TENSOR_ATOL, rtol=1e-5)
