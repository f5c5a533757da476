"""MatryoshkaPipeline and `matryoshka generate` on tiny random models (CPU, a few seconds in all)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import random_model
from matryoshka import cli
from matryoshka.commands.generate import level_path
from matryoshka.conditioning.testing import make_tiny_t5
from matryoshka.diffusion import DiffusionConfig
from matryoshka.model_dir import MDMConfig, save_model_dir
from matryoshka.models import LevelConfig, ModelConfig
from matryoshka.pipeline import MatryoshkaPipeline, available_samplers

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ml-mdm" / "nested_tiny"
if not FIXTURE.is_dir():
    FIXTURE = Path("/work/shared/fixtures/ml-mdm/nested_tiny")
STEPS = 4
CLASS_NAMES = ["boot", "shirt", "bag"]


def tiny_model_config(text_dim: int = 0, num_classes: int = 0, channels: int = 1) -> ModelConfig:
    """32 over 16: an outer band (16, 16 wide) around a core (16, 32 wide) with cross-attention."""
    outer = LevelConfig(channels=[16, 16], num_res_blocks=[1, 1], norm_groups=8, temb_dim=64)
    core = LevelConfig(
        channels=[16, 32], num_res_blocks=[1, 1], attention_layers=[0, 1], num_heads=2, norm_groups=8, temb_dim=64
    )
    config = ModelConfig(
        levels=[outer, core], image_size=32, in_channels=channels, text_dim=text_dim, num_classes=num_classes
    )
    config.validate()
    return config


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> Path:
    return make_tiny_t5(tmp_path_factory.mktemp("t5") / "tiny-t5")


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory, tiny_t5) -> Path:
    config = MDMConfig(model=tiny_model_config(text_dim=32), diffusion=DiffusionConfig(), text_encoder=f"t5:{tiny_t5}")
    return save_model_dir(tmp_path_factory.mktemp("text-model"), random_model(config.model), config)


@pytest.fixture(scope="module")
def text_pipe(text_model_dir) -> MatryoshkaPipeline:
    return MatryoshkaPipeline.from_pretrained(text_model_dir)


def generate(pipe: MatryoshkaPipeline, prompt="a red cat", **kwargs):
    kwargs = {"num_inference_steps": STEPS, "generator": 0, "progress": False, **kwargs}
    return pipe(prompt, **kwargs)


def test_save_pretrained_round_trip_gives_identical_images(text_pipe, tmp_path):
    before = generate(text_pipe, num_images_per_prompt=2)
    text_pipe.save_pretrained(tmp_path / "copy")
    reloaded = MatryoshkaPipeline.from_pretrained(tmp_path / "copy")
    after = generate(reloaded, num_images_per_prompt=2)
    assert reloaded.config.text_encoder == text_pipe.config.text_encoder
    for a, b in zip(before.tensors, after.tensors, strict=True):
        assert torch.equal(a, b)
    assert [np.asarray(i).tolist() for i in before.images] == [np.asarray(i).tolist() for i in after.images]


def test_same_seed_same_images_other_seed_other_images(text_pipe):
    first, again = generate(text_pipe), generate(text_pipe)
    other = generate(text_pipe, generator=1)
    assert torch.equal(first.tensors[0], again.tensors[0])
    assert not torch.allclose(first.tensors[0], other.tensors[0])
    # A torch.Generator works the same as its seed.
    from_generator = generate(text_pipe, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first.tensors[0], from_generator.tensors[0])


def test_guidance_scale_changes_outputs(text_pipe):
    unguided = generate(text_pipe, guidance_scale=1.0)
    guided = generate(text_pipe, guidance_scale=5.0)
    per_level = generate(text_pipe, guidance_scale=[5.0, 5.0])
    difference = (unguided.tensors[0] - guided.tensors[0]).abs().mean()
    assert difference > 1e-3
    assert torch.allclose(guided.tensors[0], per_level.tensors[0], atol=1e-5)
    # Guiding only the top level leaves the core's guidance at 1, which differs from guiding both.
    top_only = generate(text_pipe, guidance_scale=[5.0, 1.0])
    assert not torch.allclose(top_only.tensors[1], guided.tensors[1])


def test_guidance_runs_both_branches_in_one_forward(text_pipe, monkeypatch):
    batch_sizes = []
    original = text_pipe.model.forward

    def counting_forward(pyramid, t, **kwargs):
        batch_sizes.append(pyramid[-1].shape[0])
        return original(pyramid, t, **kwargs)

    monkeypatch.setattr(text_pipe.model, "forward", counting_forward)
    generate(text_pipe, guidance_scale=3.0, num_images_per_prompt=3)
    assert batch_sizes == [6] * STEPS  # 3 unconditional + 3 conditional rows, one call per step


def test_negative_prompt_changes_outputs(text_pipe):
    default = generate(text_pipe, guidance_scale=5.0)
    explicit_empty = generate(text_pipe, guidance_scale=5.0, negative_prompt="")
    negative = generate(text_pipe, guidance_scale=5.0, negative_prompt="a blue dog")
    assert torch.equal(default.tensors[0], explicit_empty.tensors[0])
    assert (default.tensors[0] - negative.tensors[0]).abs().mean() > 1e-3


def test_prompts_and_output_levels(text_pipe):
    out = generate(text_pipe, ["a red cat", "a blue dog"], num_images_per_prompt=2, output_levels=True)
    assert len(out.images) == 4
    assert all(isinstance(image, Image.Image) and image.size == (32, 32) and image.mode == "L" for image in out.images)
    assert out.levels is not None and len(out.levels) == 2
    assert [image.size for image in out.levels[0]] == [(32, 32)] * 4
    assert [image.size for image in out.levels[1]] == [(16, 16)] * 4
    assert [tuple(t.shape) for t in out.tensors] == [(4, 1, 32, 32), (4, 1, 16, 16)]
    assert all(t.min() >= -1 and t.max() <= 1 for t in out.tensors)
    # Rows are prompt-major: the two images of one prompt differ (own noise), prompts differ too.
    assert not torch.equal(out.tensors[0][0], out.tensors[0][1])
    assert generate(text_pipe, output_levels=False).levels is None


def test_ddpm_and_eta_use_the_generator(text_pipe):
    ddpm = generate(text_pipe, sampler="ddpm")
    assert torch.equal(ddpm.tensors[0], generate(text_pipe, sampler="ddpm").tensors[0])
    assert not torch.allclose(ddpm.tensors[0], generate(text_pipe).tensors[0])
    noisy = generate(text_pipe, eta=1.0)
    assert not torch.allclose(noisy.tensors[0], generate(text_pipe).tensors[0])


def test_callback_sees_every_step(text_pipe):
    seen = []
    generate(text_pipe, callback=lambda state: seen.append((state.index, len(state.x0))))
    assert seen == [(i, 2) for i in range(STEPS)]


def test_scheduler_registry_is_the_extension_point(text_pipe):
    from matryoshka import schedulers

    assert {"ddim", "ddpm"} <= set(available_samplers())
    calls = []

    class Recording(schedulers.DDIMScheduler):
        name = "test-recording"

        def set_timesteps(self, *args, **kwargs):
            super().set_timesteps(*args, **kwargs)
            calls.append(list(self.times))

    schedulers.register_scheduler("test-recording", Recording)
    try:
        out = generate(text_pipe, sampler="test-recording")
        assert torch.equal(out.tensors[0], generate(text_pipe).tensors[0])
        assert calls and calls[0][0] > calls[0][-1] == 0 and len(calls[0]) == STEPS + 1
        with pytest.raises(ValueError, match="already registered"):
            schedulers.register_scheduler("test-recording", Recording)
    finally:
        schedulers.SCHEDULERS.pop("test-recording")
    with pytest.raises(ValueError, match="unknown sampler 'euler-nope'"):
        generate(text_pipe, sampler="euler-nope")


def test_bad_inputs_are_named(text_pipe):
    with pytest.raises(ValueError, match="text-conditional: pass a prompt"):
        text_pipe(None, progress=False)
    with pytest.raises(ValueError, match="not class-conditional"):
        generate(text_pipe, class_labels=1)
    with pytest.raises(ValueError, match="guidance_scale has 3 entries"):
        generate(text_pipe, guidance_scale=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="negative_prompt must be"):
        generate(text_pipe, ["a", "b"], negative_prompt=["only one"])
    with pytest.raises(ValueError, match="num_inference_steps"):
        generate(text_pipe, num_inference_steps=0)


def test_text_encoder_width_mismatch_is_an_error(text_model_dir, tmp_path):
    wide = make_tiny_t5(tmp_path / "wide-t5", d_model=64)
    with pytest.raises(ValueError, match="64-d states but the model expects model.text_dim = 32"):
        MatryoshkaPipeline.from_pretrained(text_model_dir, text_encoder=f"t5:{wide}")


def test_class_conditional_model(tmp_path):
    config = MDMConfig(
        model=tiny_model_config(num_classes=3, channels=3), diffusion=DiffusionConfig(), class_names=CLASS_NAMES
    )
    save_model_dir(tmp_path / "classes", random_model(config.model, seed=1), config)
    pipe = MatryoshkaPipeline.from_pretrained(tmp_path / "classes")
    by_name = pipe(class_labels=["boot", "Bag"], num_inference_steps=STEPS, generator=0, progress=False)
    by_id = pipe(class_labels=[0, 2], num_inference_steps=STEPS, generator=0, progress=False)
    assert torch.equal(by_name.tensors[0], by_id.tensors[0])
    assert by_name.images[0].mode == "RGB" and len(by_name.images) == 2
    other = pipe(class_labels=[1, 1], num_inference_steps=STEPS, generator=0, progress=False)
    assert not torch.allclose(by_id.tensors[0], other.tensors[0])
    unguided = pipe(class_labels=[0, 2], num_inference_steps=STEPS, generator=0, progress=False, guidance_scale=1)
    assert not torch.allclose(by_id.tensors[0], unguided.tensors[0])
    with pytest.raises(ValueError, match="unknown class name 'hat'; known names: boot, shirt, bag"):
        pipe(class_labels="hat", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        pipe(class_labels=3, progress=False)
    with pytest.raises(ValueError, match="class-conditional: pass class_labels"):
        pipe(progress=False)

    # The CLI takes class names or ids.
    out = tmp_path / "bag.png"
    assert cli.main(["generate", "--model", str(tmp_path / "classes"), "--class", "2", "--steps", "2",
                     "--seed", "3", "--quiet", "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 32)


@pytest.mark.skipif(
    not FIXTURE.is_dir(), reason="the ml-mdm conformance fixtures (../shared/fixtures/ml-mdm) are not checked out here"
)
def test_official_checkpoint_generates_through_the_cli(tmp_path, capsys):
    t5 = make_tiny_t5(tmp_path / "t5-64", d_model=64)  # the fixture's text states are 64-d
    pipe = MatryoshkaPipeline.from_official(FIXTURE / "vis_model.pth", FIXTURE / "config.yaml", text_encoder=str(t5))
    assert pipe.config.model.sizes == [32, 16] and pipe.config.text_encoder == f"t5:{t5}"
    direct = pipe("a cat on the beach", num_inference_steps=3, guidance_scale=5.0, generator=7, progress=False)

    out = tmp_path / "official" / "cat.png"
    argv = ["generate", "a cat on the beach", "--official", str(FIXTURE / "vis_model.pth"),
            "--config", str(FIXTURE / "config.yaml"), "--text-encoder", f"t5:{t5}", "--steps", "3",
            "--guidance", "5", "--seed", "7", "--all-levels", "--out", str(out)]
    assert cli.main(argv) == 0
    image = Image.open(out)
    assert image.size == (32, 32) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(direct.images[0]))
    assert Image.open(level_path(out, 0)).size == (32, 32)
    assert Image.open(level_path(out, 1)).size == (16, 16)
    assert "seed 7" in capsys.readouterr().out

    # The loaded official model saves as our format and comes back identical.
    pipe.save_pretrained(tmp_path / "converted")
    again = MatryoshkaPipeline.from_pretrained(tmp_path / "converted")
    same = again("a cat on the beach", num_inference_steps=3, guidance_scale=5.0, generator=7, progress=False)
    assert torch.equal(direct.tensors[0], same.tensors[0])


def test_official_text_model_needs_a_text_encoder():
    if not FIXTURE.is_dir():
        pytest.skip("the ml-mdm conformance fixtures (../shared/fixtures/ml-mdm) are not checked out here")
    with pytest.raises(ValueError, match="t5:google/flan-t5-xl"):
        MatryoshkaPipeline.from_official(FIXTURE / "vis_model.pth", FIXTURE / "config.yaml")


def test_cli_grid_and_levels(text_model_dir, tmp_path):
    out = tmp_path / "grid.png"
    argv = ["generate", "a red cat", "--model", str(text_model_dir), "--steps", "2", "--num-images", "4",
            "--guidance", "3,1", "--seed", "0", "--all-levels", "--quiet", "--out", str(out)]
    assert cli.main(argv) == 0
    # 2 x 2 grid of 32 px cells with 2 px padding.
    assert Image.open(out).size == (2 * 34 + 2, 2 * 34 + 2)
    assert Image.open(level_path(out, 1)).size == (2 * 18 + 2, 2 * 18 + 2)


def test_cli_precision_bf16_reaches_the_pipeline_and_stays_close_to_fp32(text_model_dir, tmp_path, monkeypatch):
    from matryoshka.pipeline import MatryoshkaPipeline

    seen = []
    call = MatryoshkaPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("precision"))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(MatryoshkaPipeline, "__call__", spy)
    pictures = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.png"
        argv = ["generate", "a red cat", "--model", str(text_model_dir), "--steps", "3", "--seed", "0",
                "--quiet", "--precision", precision, "--out", str(out)]
        assert cli.main(argv) == 0
        pictures[precision] = np.asarray(Image.open(out), dtype=np.float64)
    assert seen == ["fp32", "bf16"]
    difference = np.abs(pictures["bf16"] - pictures["fp32"])
    assert difference.max() > 0  # bf16 did run: its rounding changes some pixels
    assert difference.mean() < 8  # out of 255: the same pictures


def conv3x3_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] == 3]


def test_channels_last_pipeline_draws_the_same_images(text_model_dir, tmp_path, monkeypatch):
    from matryoshka.pipeline import MatryoshkaPipeline

    pipe = MatryoshkaPipeline.from_pretrained(text_model_dir)
    kwargs = dict(num_inference_steps=3, guidance_scale=3.0, generator=0, progress=False)
    plain = np.asarray(pipe("a red cat", **kwargs).images[0], dtype=np.float64)
    assert pipe.to(memory_format=torch.channels_last) is pipe
    convs = [w for w in conv3x3_weights(pipe.model) if w.shape[1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    channels_last = np.asarray(pipe("a red cat", **kwargs).images[0], dtype=np.float64)
    assert np.abs(channels_last - plain).max() <= 1  # out of 255: summation order only
    saved = pipe.save_pretrained(tmp_path / "saved")  # channels-last weights save as ordinary tensors
    again = MatryoshkaPipeline.from_pretrained(saved)
    assert np.abs(np.asarray(again("a red cat", **kwargs).images[0], dtype=np.float64) - plain).max() <= 1
    pipe.to(memory_format=torch.contiguous_format)
    assert all(w.is_contiguous() for w in convs)

    # the command's flag reaches the pipeline
    layouts = []
    call = MatryoshkaPipeline.__call__

    def spy(self, *args, **kwargs):
        weight = next(w for w in conv3x3_weights(self.model) if w.shape[1] > 1)
        layouts.append(weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous())
        return call(self, *args, **kwargs)

    monkeypatch.setattr(MatryoshkaPipeline, "__call__", spy)
    for flag in ([], ["--channels-last"]):
        argv = ["generate", "a red cat", "--model", str(text_model_dir), "--steps", "2", "--seed", "0", "--quiet",
                "--out", str(tmp_path / "cl.png"), "--overwrite", *flag]
        assert cli.main(argv) == 0
    assert layouts == [False, True]


def test_cli_errors_are_clear(text_model_dir, tmp_path, capsys, monkeypatch):
    from matryoshka.commands import generate as command

    out = str(tmp_path / "x.png")
    assert cli.main(["generate", "a cat", "--model", str(text_model_dir), "--guidance", "lots", "--out", out]) == 2
    assert "--guidance must be a number" in capsys.readouterr().err
    monkeypatch.setattr(command, "default_model_dir", lambda: tmp_path / "missing")
    assert cli.main(["generate", "a cat", "--out", out]) == 2
    message = capsys.readouterr().err
    assert "embedded default model is not installed" in message and "matryoshka train" in message


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--all-levels" in text and "--negative-prompt" in text and "--official" in text


def test_embedded_default_model_generates_without_model_argument(tmp_path):
    """The package ships a trained Fashion-MNIST text-to-image model; `generate` uses it by default."""
    from matryoshka.commands.generate import default_model_dir

    assert (default_model_dir() / "model.safetensors").is_file(), "the embedded model is missing from the package"
    assert (default_model_dir() / "model_card.md").is_file()
    out = tmp_path / "sneaker.png"
    argv = ["generate", "a pair of sneakers", "--steps", "2", "--seed", "0", "--quiet", "--out", str(out)]
    assert cli.main(argv) == 0
    image = Image.open(out)
    assert image.size == (32, 32) and image.mode == "L"
