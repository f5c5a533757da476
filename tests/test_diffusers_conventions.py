"""The pipeline driven the way a diffusers user drives one: scheduler objects and swapping them, the loop by
hand, from_pretrained by name / path / hub id (offline, from a locally populated hub cache), output_type,
return_dict, latents, prompt embeddings, lists of generators, callback_on_step_end, dtypes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import random_model
from matryoshka.conditioning.testing import make_tiny_t5
from matryoshka.diffusion import DiffusionConfig
from matryoshka.model_dir import MDMConfig, save_model_dir
from matryoshka.models import LevelConfig, ModelConfig
from matryoshka.pipeline import MatryoshkaPipeline, available_samplers
from matryoshka.schedule import spaced_timesteps
from matryoshka.schedulers import (
    SCHEDULERS,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerScheduler,
    HeunScheduler,
    make_scheduler,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
STEPS = 4


def levels(text: bool) -> list[LevelConfig]:
    core = LevelConfig(channels=[8, 16], num_res_blocks=[1, 1], attention_layers=[0, 1] if text else None,
                       num_heads=2, norm_groups=4, temb_dim=32)
    return [LevelConfig(channels=[8, 8], num_res_blocks=[1, 1], norm_groups=4, temb_dim=32), core]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    t5 = make_tiny_t5(tmp_path_factory.mktemp("t5") / "t5")
    config = MDMConfig(model=ModelConfig(levels=levels(True), image_size=16, in_channels=1, text_dim=32),
                       diffusion=DiffusionConfig(), text_encoder=f"t5:{t5}")
    return save_model_dir(tmp_path_factory.mktemp("text"), random_model(config.model), config)


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory) -> Path:
    config = MDMConfig(model=ModelConfig(levels=levels(False), image_size=16, in_channels=1, num_classes=3),
                       diffusion=DiffusionConfig())
    return save_model_dir(tmp_path_factory.mktemp("class"), random_model(config.model), config)


@pytest.fixture(scope="module")
def pipe(text_dir) -> MatryoshkaPipeline:
    return MatryoshkaPipeline.from_pretrained(text_dir)


def call(pipe, prompt="a red cat", **kwargs):
    return pipe(prompt, **{"num_inference_steps": STEPS, "generator": 0, "progress": False, **kwargs})


def test_swapping_the_scheduler_object_equals_naming_it(pipe):
    original = pipe.scheduler
    try:
        for cls in (DPMSolverMultistepScheduler, EulerScheduler, HeunScheduler):
            pipe.scheduler = cls.from_config(original.config)
            swapped = call(pipe)
            pipe.scheduler = original
            named = call(pipe, sampler=cls.name)
            assert torch.equal(swapped.tensors[0], named.tensors[0]), cls.name
    finally:
        pipe.scheduler = original
    assert DDIMScheduler.from_config({"name": "ddim", "eta": 0.5}).config.eta == 0.5
    assert EulerScheduler.from_config(DDIMScheduler(eta=1.0).config).config.eta == 0.0  # what does not apply


def test_the_loop_by_hand_is_what_the_pipeline_runs(class_dir):
    pipe = MatryoshkaPipeline.from_pretrained(class_dir)
    labels = torch.tensor([0, 2])
    generator = torch.Generator().manual_seed(5)
    latents = [torch.randn((2, *shape), generator=generator) for shape in pipe.level_shapes()]
    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(STEPS, pipe.schedule, prediction="v", threshold="clip")
    sample = latents
    for _ in scheduler.timesteps:
        output = pipe.model(scheduler.scale_model_input(sample), scheduler.model_time(2, torch.device("cpu")),
                            labels=labels)
        sample = scheduler.step(output, sample).prev_sample
    by_hand = sample[0].clip(-1, 1)
    piped = pipe(class_labels=[0, 2], num_inference_steps=STEPS, guidance_scale=1.0, sampler="dpmpp_2m",
                 latents=latents, output_type="pt", progress=False)
    torch.testing.assert_close(piped.tensors[0], by_hand)
    torch.testing.assert_close(piped.images, (by_hand + 1) / 2)
    with pytest.raises(RuntimeError, match="all 4 steps were taken"):
        scheduler.step(output, sample)


def test_custom_timesteps_replace_the_step_count(pipe):
    """timesteps= (diffusers' argument): the official grid given by hand equals num_inference_steps; another
    grid changes the images; a grid that does not end at the clean image is refused."""
    official = spaced_timesteps(pipe.schedule.num_train_steps, STEPS)
    by_count = call(pipe, output_type="pt").tensors[0]
    by_grid = call(pipe, num_inference_steps=999, timesteps=official.tolist(), output_type="pt").tensors[0]
    assert torch.equal(by_count, by_grid)
    longer = call(pipe, timesteps=[*official.tolist()[:-1], 5, 0], output_type="pt").tensors[0]
    assert not torch.allclose(longer, by_count)
    with pytest.raises(ValueError, match="must end at 0"):
        call(pipe, timesteps=official.tolist()[:-1])


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_init_image_callbacks_and_thresholding_alike_under_every_scheduler(pipe, name):
    core = torch.rand(1, 8, 8) * 2 - 1
    seen, x0_ranges = [], []

    def on_step_end(p, step, t, kwargs):
        seen.append(step)
        x0_ranges.append(max(float(x.abs().max()) for x in kwargs["x0"]))
        return {"latents": kwargs["latents"]}

    out = call(pipe, sampler=name, init_image=core, init_level=1, callback_on_step_end=on_step_end,
               callback_on_step_end_tensor_inputs=["latents", "x0"])
    torch.testing.assert_close(out.tensors[1][0], core)  # the pinned level is the given image at the end
    calls = 2 * STEPS - 1 if name == "heun" else STEPS
    assert seen == list(range(calls))
    assert max(x0_ranges) <= 1.0  # clip thresholding of every x0 estimate

    def zero_latents(p, step, t, kwargs):
        return {"latents": [torch.zeros_like(x) for x in kwargs["latents"]]} if step == 0 else {}

    changed = call(pipe, sampler=name, callback_on_step_end=zero_latents)
    assert not torch.equal(changed.tensors[0], call(pipe, sampler=name).tensors[0])


def test_the_model_directory_saves_the_scheduler_and_from_pretrained_finds_models(pipe, tmp_path):
    original = pipe.scheduler
    try:
        pipe.scheduler = HeunScheduler()
        pipe.save_pretrained(tmp_path / "saved")
    finally:
        pipe.scheduler = original
    again = MatryoshkaPipeline.from_pretrained(tmp_path / "saved")
    assert isinstance(again.scheduler, HeunScheduler)
    bundled = MatryoshkaPipeline.from_pretrained("fashion-t2i")
    assert bundled.config.model.sizes == [32, 16]
    with pytest.raises(FileNotFoundError, match="not a model directory, a bundled model"):
        MatryoshkaPipeline.from_pretrained("no-such-model")


def populate_hub_cache(cache: Path, repo: str, source: Path, commit: str = "0" * 40) -> None:
    """What huggingface_hub leaves after downloading `repo` at `commit` on branch main."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file():
            shutil.copy(file, snapshot / file.name)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


def test_from_pretrained_with_a_hub_id_reads_the_hub_cache_offline(class_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    populate_hub_cache(tmp_path / "hub", "someone/tiny-mdm", class_dir)
    pipe = MatryoshkaPipeline.from_pretrained("someone/tiny-mdm", cache_dir=tmp_path / "hub", revision="main")
    local = MatryoshkaPipeline.from_pretrained(class_dir)
    options = {"class_labels": [1], "num_inference_steps": 2, "generator": 0, "progress": False}
    assert torch.equal(pipe(**options).tensors[0], local(**options).tensors[0])
    monkeypatch.delenv("HF_HUB_OFFLINE")
    again = MatryoshkaPipeline.from_pretrained("someone/tiny-mdm", cache_dir=tmp_path / "hub", local_files_only=True)
    assert again.config.model.sizes == [16, 8]
    with pytest.raises(FileNotFoundError, match="not in the hub cache"):
        MatryoshkaPipeline.from_pretrained("someone/other", cache_dir=tmp_path / "hub", local_files_only=True)


def test_push_to_hub_uploads_the_saved_directory(pipe, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo, private=None, exist_ok=False):
            calls.append(("create", repo))

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    pipe.save_pretrained(tmp_path / "tiny-mdm", push_to_hub=True, repo_id="me/tiny-mdm")
    assert calls == [("create", "me/tiny-mdm"), ("upload", "me/tiny-mdm", ["config.yaml", "model.safetensors"])]


def test_output_types_and_return_dict(pipe):
    pil = call(pipe)
    pt = call(pipe, output_type="pt")
    arr = call(pipe, output_type="np")
    assert isinstance(pil.images[0], __import__("PIL").Image.Image)
    assert pt.images.shape == (1, 1, 16, 16) and float(pt.images.min()) >= 0 and float(pt.images.max()) <= 1
    assert isinstance(arr.images, np.ndarray) and arr.images.shape == (1, 16, 16, 1)
    np.testing.assert_allclose(arr.images[0, ..., 0], pt.images[0, 0].numpy())
    (images,) = call(pipe, return_dict=False)
    assert len(images) == 1
    with pytest.raises(ValueError, match="output_type"):
        call(pipe, output_type="latent")


def test_latents_prompt_embeds_and_generator_lists(pipe):
    generator = torch.Generator().manual_seed(0)
    latents = [torch.randn((1, *shape), generator=generator) for shape in pipe.level_shapes()]
    assert torch.equal(call(pipe, latents=latents).tensors[0], call(pipe).tensors[0])  # seed 0 draws these
    embedding = pipe.text_encoder.encode(["a red cat"])
    by_embeds = pipe(prompt_embeds=embedding.states, prompt_attention_mask=embedding.mask, num_inference_steps=STEPS,
                     generator=0, progress=False)
    torch.testing.assert_close(by_embeds.tensors[0], call(pipe).tensors[0])
    seeds = [3, 4, 5]
    together = call(pipe, prompt=["a red cat", "a dog", "a bird"], sampler="ddpm",
                    generator=[torch.Generator().manual_seed(s) for s in seeds])
    for i, (prompt, seed) in enumerate(zip(["a red cat", "a dog", "a bird"], seeds, strict=True)):
        alone = call(pipe, prompt=prompt, sampler="ddpm", generator=seed)
        torch.testing.assert_close(together.tensors[0][i], alone.tensors[0][0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="one generator per image"):
        call(pipe, prompt=["a", "b"], generator=[torch.Generator()])


def test_dtypes_and_the_progress_bar(pipe, text_dir, capsys):
    bf16 = MatryoshkaPipeline.from_pretrained(text_dir, torch_dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    out = call(bf16)
    assert out.tensors[0].dtype == torch.float32
    assert (out.tensors[0] - call(pipe).tensors[0]).abs().mean() < 0.05
    assert MatryoshkaPipeline.from_pretrained(text_dir).to("cpu", torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="floating-point"):
        pipe.to(torch.int64)
    pipe.set_progress_bar_config(disable=True)
    try:
        pipe("a red cat", num_inference_steps=2, generator=0)
        assert "ddim" not in capsys.readouterr().err
    finally:
        pipe.set_progress_bar_config()


def test_make_scheduler_names_are_the_cli_choices():
    assert set(available_samplers()) == set(SCHEDULERS) and isinstance(make_scheduler("heun"), HeunScheduler)
    with pytest.raises(ValueError, match="eta"):
        make_scheduler("euler", eta=1.0)
