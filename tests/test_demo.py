"""`matryoshka demo` without a browser: request validation, per-level results, step previews,
cancellation, one-at-a-time serving under concurrent callers, and the command's options.

A tiny random text-to-image model (MiniLM text encoder, bundled offline) stands in for the embedded one.
"""

from __future__ import annotations

import argparse
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from matryoshka import cli
from matryoshka.commands import demo as demo_command
from matryoshka.demo import (
    DemoCancelled,
    DemoLimits,
    DemoRequestError,
    display_image,
    generate_request,
    pipeline_lock,
    stream_request,
)
from matryoshka.diffusion import DiffusionConfig
from matryoshka.model_dir import MDMConfig, save_model_dir
from matryoshka.models import LevelConfig, ModelConfig, NestedUNet
from matryoshka.pipeline import MatryoshkaPipeline, available_samplers
from matryoshka.typed_config import ConfigError

LIMITS = DemoLimits(max_steps=12, max_images=3, max_prompt_chars=40)
MINILM_DIM = 384


def tiny_config(text_dim: int = MINILM_DIM, num_classes: int = 0) -> ModelConfig:
    """32 over 16, a few thousand parameters: fast enough for many requests per test."""
    outer = LevelConfig(channels=[8, 8], num_res_blocks=[1, 1], norm_groups=4, temb_dim=32)
    core = LevelConfig(
        channels=[8, 16], num_res_blocks=[1, 1], attention_layers=[0, 1], num_heads=2, norm_groups=4, temb_dim=32
    )
    config = ModelConfig(levels=[outer, core], image_size=32, in_channels=1, text_dim=text_dim, num_classes=num_classes)
    config.validate()
    return config


def write_tiny_model(
    directory: Path, text_dim: int = MINILM_DIM, num_classes: int = 0, diffusion: DiffusionConfig | None = None, **extra
) -> Path:
    """A random NestedUNet with its zero-initialised layers made non-zero, so prompts and seeds matter."""
    torch.manual_seed(0)
    config = MDMConfig(
        model=tiny_config(text_dim, num_classes), diffusion=diffusion or DiffusionConfig(),
        text_encoder="minilm" if text_dim else None, **extra,
    )
    model = NestedUNet(config.model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return save_model_dir(directory, model, config)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """These models are so small that intra-op threads only add synchronisation; on a busy 2-core
    machine two threads made this module 4x slower (64 s against 14 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("demo-model"))


@pytest.fixture(scope="module")
def pipe(model_dir) -> MatryoshkaPipeline:
    return MatryoshkaPipeline.from_pretrained(model_dir)



def fields(prompt: str, steps: int, guidance: float, seed: int, n: int) -> dict:
    return {"prompt": prompt, "steps": steps, "guidance": guidance, "seed": seed, "num_images": n}

def request(pipe, prompt="a red sneaker", negative="", steps=4, guidance=5.0, seed=0, sampler="ddim", n=1, **kw):
    fields = {"prompt": prompt, "negative_prompt": negative, "steps": steps, "guidance": guidance, "seed": seed,
              "sampler": sampler, "num_images": n}
    return generate_request(pipe, fields, LIMITS, **kw)


def arrays(images_per_level) -> list[list[list]]:
    return [[np.asarray(image).tolist() for image in level] for level in images_per_level]


@contextmanager
def count_forwards(pipe: MatryoshkaPipeline) -> Iterator[list[int]]:
    """calls[0]: how many times the network ran inside the block."""
    calls = [0]
    handle = pipe.model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


# ---- results ------------------------------------------------------------------------------------------


def test_every_level_is_returned_and_equals_the_pipeline_output(pipe):
    images, info = request(pipe, steps=4, seed=7, n=2, negative="blurry")
    assert [len(level) for level in images] == [2, 2]
    assert [level[0].size for level in images] == [(32, 32), (16, 16)]
    direct = pipe(
        "a red sneaker", negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0, generator=7,
        num_images_per_prompt=2, output_levels=True, progress=False,
    )
    assert arrays(images) == arrays(direct.levels)
    assert "seed 7" in info and "4 ddim steps" in info and "2 image(s)" in info
    # The prompt and the seed both change the result (the request really reaches the model).
    assert arrays(request(pipe, steps=4, seed=8, n=2, negative="blurry")[0]) != arrays(images)
    assert arrays(request(pipe, "a blue bag", steps=4, seed=7, n=2, negative="blurry")[0]) != arrays(images)


def test_bf16_requests_run_under_autocast_and_stay_close(pipe):
    dtypes = []
    handle = pipe.model.register_forward_hook(lambda module, args, out: dtypes.append(torch.get_autocast_dtype("cpu")
                                                                                    if torch.is_autocast_enabled("cpu")
                                                                                    else None))
    try:
        plain, _ = request(pipe, steps=3, seed=1)
        bf16, _ = request(pipe, steps=3, seed=1, precision="bf16")
    finally:
        handle.remove()
    assert dtypes == [None] * 3 + [torch.bfloat16] * 3
    difference = np.abs(np.asarray(bf16[0][0], dtype=np.float64) - np.asarray(plain[0][0], dtype=np.float64))
    assert difference.mean() < 8  # out of 255: the same picture


def test_command_passes_precision_and_channels_last(model_dir, monkeypatch):
    import matryoshka.demo

    built = {}
    monkeypatch.setattr(matryoshka.demo, "build_demo", lambda pipe, limits, title=None, precision="fp32", guide=None:
                        built.update(pipe=pipe, precision=precision) or RecordingPage())
    assert cli.main(["demo", "--model", str(model_dir), "--precision", "bf16", "--channels-last"]) == 0
    assert built["precision"] == "bf16"
    convs = [m.weight for m in built["pipe"].model.modules()
             if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] == 3 and m.weight.shape[1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)


def test_gradio_style_values_are_accepted(pipe):
    reference = arrays(request(pipe, "a red sneaker", steps=3, seed=5, n=2)[0])
    # Sliders and numbers arrive as floats or strings; prompts may carry line breaks or arrive as UTF-8 bytes.
    same = request(pipe, "  a red\nsneaker ", steps=3.0, seed="5", n=2.0)[0]
    assert arrays(same) == reference
    assert arrays(request(pipe, "a red sneaker", steps="3", seed=5.0, n="2")[0]) == reference
    # Non-ASCII text is fine (as str or UTF-8 bytes): only control characters and broken UTF-8 are refused.
    german = arrays(request(pipe, "ein grüner Schuh ✓", steps=2)[0])
    assert arrays(request(pipe, "ein grüner Schuh ✓".encode(), steps=2)[0]) == german


def test_empty_seed_draws_a_random_one_and_reports_it(pipe):
    images, info = request(pipe, steps=2, seed=None)
    seed = int(info.split("seed ")[1].split(" ")[0])
    assert arrays(request(pipe, steps=2, seed=seed)[0]) == arrays(images)


def test_step_hook_sees_every_step_and_every_level(pipe):
    seen = []
    images, _ = request(pipe, steps=5, n=2, on_step=lambda step, total, x0: seen.append((step, total, x0)))
    assert [(step, total) for step, total, _ in seen] == [(i, 5) for i in range(1, 6)]
    for _, _, x0 in seen:
        assert [tuple(level.shape) for level in x0] == [(2, 1, 32, 32), (2, 1, 16, 16)]
        assert all(level.min() >= -1 and level.max() <= 1 for level in x0)
    # After the last step the clean estimate is the image itself (up to uint8 rounding).
    final = np.stack([np.asarray(image, dtype=np.float32) for image in images[0]])
    preview = (seen[-1][2][0][:, 0].numpy() + 1) * 127.5
    assert np.abs(final - preview).max() <= 2


def test_stream_yields_previews_then_the_result(pipe):
    progress = []
    updates = list(
        stream_request(pipe, fields("a bag", 6, 3.0, 1, 2), LIMITS, progress=lambda f, d: progress.append(f))
    )
    *previews, (images, info, done) = updates
    assert done and "seed 1" in info
    assert arrays(images) == arrays(request(pipe, "a bag", steps=6, guidance=3.0, seed=1, n=2)[0])
    for preview_levels, text, preview_done in previews:
        assert not preview_done and text.startswith("denoising: step")
        assert [img.size for img in preview_levels[0]] == [(32, 32)] * 2
    steps = [fraction[0] for fraction in progress]
    assert steps == sorted(steps) and all(1 <= s <= 6 for s in steps) and len(steps) == len(previews)


def test_closing_the_stream_cancels_the_request(pipe):
    with count_forwards(pipe) as calls:
        stream = stream_request(pipe, fields("a coat", 12, 3.0, 0, 1), LIMITS)
        first = next(stream)
        assert not first[2]
        stream.close()  # the page went away
        lock = pipeline_lock(pipe)
        assert lock.acquire(timeout=20), "the cancelled request kept the model"
        lock.release()
    assert calls[0] < 12


@pytest.mark.parametrize("sampler", available_samplers())
def test_every_registered_sampler_is_served_with_progress(pipe, sampler):
    seen = []
    images, info = request(pipe, steps=3, sampler=sampler, on_step=lambda step, total, x0: seen.append(step))
    calls = 5 if sampler == "heun" else 3  # Heun calls the network twice per step but the last
    assert seen == list(range(1, calls + 1)) and f"3 {sampler} steps" in info
    assert [level[0].size for level in images] == [(32, 32), (16, 16)]


def test_step_hook_can_cancel(pipe):
    def stop(step, total, x0):
        raise DemoCancelled("stop")

    with pytest.raises(DemoCancelled):
        request(pipe, steps=3, on_step=stop)
    assert not pipeline_lock(pipe).locked()


# ---- refusals -----------------------------------------------------------------------------------------

REFUSED = [
    ({"steps": 13}, "steps must be between 1 and 12"),
    ({"steps": 0}, "steps must be between 1 and 12"),
    ({"steps": -3}, "steps must be between 1 and 12"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"steps": float("nan")}, "steps must be a whole number"),
    ({"steps": "ten"}, "steps must be a whole number"),
    ({"steps": None}, "steps must be a whole number"),
    ({"steps": True}, "steps must be a whole number"),
    ({"steps": 10**9}, "steps must be between"),
    ({"n": 4}, "number of images must be between 1 and 3"),
    ({"n": 0}, "number of images must be between 1 and 3"),
    ({"n": -1}, "number of images must be between 1 and 3"),
    ({"n": float("inf")}, "number of images must be a whole number"),
    ({"prompt": "x" * 41}, "prompt is 41 characters long; the limit is 40"),
    ({"negative": "y" * 41}, "negative prompt is 41 characters long"),
    ({"prompt": "a\x00b"}, "prompt contains a control character (U+0000"),
    ({"prompt": "red \x1b[31mshoe"}, "prompt contains a control character (U+001B"),
    ({"negative": "\x7f"}, "negative prompt contains a control character (U+007F"),
    ({"prompt": b"\xff\xfe shoe"}, "prompt is not valid UTF-8"),
    ({"prompt": "shoe \udcff"}, "prompt is not valid UTF-8"),
    ({"prompt": 42}, "prompt must be text"),
    ({"prompt": ["a", "b"]}, "prompt must be text"),
    ({"guidance": float("nan")}, "guidance must be a finite number"),
    ({"guidance": float("inf")}, "guidance must be a finite number"),
    ({"guidance": -1.0}, "guidance must be a finite number between 0 and 30"),
    ({"guidance": 31}, "guidance must be a finite number between 0 and 30"),
    ({"guidance": "strong"}, "guidance must be a number"),
    ({"guidance": None}, "guidance must be a number"),
    ({"seed": -1}, "seed must be between 0 and"),
    ({"seed": 2**64}, "seed must be between 0 and 9223372036854775807, got 18446744073709551616"),
    ({"seed": 1e300}, "seed must be between 0 and 9223372036854775807, got a 301-digit number"),
    ({"seed": 1.5}, "seed must be a whole number"),
    ({"sampler": "no-such"}, "unknown sampler 'no-such'; choose one of ddim, ddpm"),
    ({"sampler": None}, "unknown sampler None"),
]


REFUSED_IDS = [f"{key}={value!r}"[:40] for change, _ in REFUSED for key, value in change.items()]


@pytest.mark.parametrize(("change", "message"), REFUSED, ids=REFUSED_IDS)
def test_bad_requests_are_refused_before_any_work(pipe, change, message):
    with count_forwards(pipe) as calls, pytest.raises(DemoRequestError) as error:
        request(pipe, **change)
    assert message in str(error.value)
    assert calls[0] == 0
    assert not pipeline_lock(pipe).locked()


def test_steps_are_capped_by_the_schedule_as_well(pipe, tmp_path):
    directory = write_tiny_model(tmp_path / "short", diffusion=DiffusionConfig(num_train_steps=8))
    short = MatryoshkaPipeline.from_pretrained(directory, text_encoder=pipe.text_encoder)
    with pytest.raises(DemoRequestError, match="steps must be between 1 and 8"):
        request(short, steps=10)


def test_class_conditional_models_take_a_class_name(tmp_path):
    directory = write_tiny_model(tmp_path / "classes", text_dim=0, num_classes=3, class_names=["boot", "shirt", "bag"])
    classes = MatryoshkaPipeline.from_pretrained(directory)
    by_name = request(classes, "Shirt", steps=2, seed=3)[0]
    assert arrays(by_name) == arrays(request(classes, "1", steps=2, seed=3)[0])
    assert arrays(by_name) != arrays(request(classes, "boot", steps=2, seed=3)[0])
    with pytest.raises(DemoRequestError, match="unknown class name 'hat'; known names: boot, shirt, bag"):
        request(classes, "hat", steps=2)
    with pytest.raises(DemoRequestError, match="leave the negative prompt empty"):
        request(classes, "boot", negative="shirt", steps=2)


def test_limits_are_validated():
    for field, value in (("max_steps", 0), ("max_images", -2), ("max_prompt_chars", 1.5), ("max_guidance", math.nan)):
        with pytest.raises(ConfigError, match=field):
            DemoLimits(**{field: value}).validate()


# ---- one request at a time ----------------------------------------------------------------------------


def test_concurrent_requests_neither_crash_nor_mix_outputs(pipe):
    jobs = [("a red sneaker", seed, 1 + seed % 3, 3 + seed % 2) for seed in range(6)]
    expected = {job: arrays(request(pipe, job[0], steps=job[3], seed=job[1], n=job[2])[0]) for job in jobs}
    results: dict = {}
    errors: list = []
    start = threading.Barrier(len(jobs) * 2)

    def call(job, streamed: bool) -> None:
        prompt, seed, n, steps = job
        try:
            start.wait(timeout=30)
            if streamed:  # what the page runs: the streaming wrapper around generate_request
                *_, (images, _, _) = stream_request(pipe, fields(prompt, steps, 5.0, seed, n), LIMITS)
            else:
                images, _ = request(pipe, prompt, steps=steps, seed=seed, n=n)
            results[job, streamed] = arrays(images)
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=call, args=(job, streamed)) for job in jobs for streamed in (False, True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert len(results) == len(threads)
    for (job, _streamed), images in results.items():
        assert images == expected[job], f"request {job} got another request's images"


def test_the_lock_serialises_requests(pipe):
    steps_seen: list[tuple[int, int]] = []  # (thread, step) in the order the steps ran

    def hook(step, total, x0):
        steps_seen.append((threading.get_ident(), step))

    threads = [threading.Thread(target=request, args=(pipe,), kwargs={"steps": 4, "on_step": hook}) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # 3 requests x 4 steps, each request's steps in one uninterrupted run.
    assert len(steps_seen) == 12
    runs = [steps_seen[i : i + 4] for i in range(0, 12, 4)]
    for run in runs:
        assert [step for _, step in run] == [1, 2, 3, 4] and len({thread for thread, _ in run}) == 1
    assert len({run[0][0] for run in runs}) == 3


# ---- page helpers and the command ---------------------------------------------------------------------


def test_display_images_are_enlarged_by_whole_factors():
    from PIL import Image

    small = Image.fromarray(np.arange(16 * 16, dtype=np.uint8).reshape(16, 16))
    big = display_image(small, side=100)
    assert big.size == (112, 112)  # 7 x 16: the smallest whole factor reaching 100 pixels
    assert np.array_equal(np.asarray(big)[::7, ::7], np.asarray(small))
    assert display_image(big, side=100) is big


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo_command.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_bind_to_localhost():
    args = parse()
    assert (args.host, args.port, args.max_steps, args.max_images, args.max_prompt_chars) == (
        "127.0.0.1", 7860, 100, 4, 300,
    )
    assert "demo" in cli.COMMANDS


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True), ("[::1]", True),
     ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("example.org", False)],
)
def test_is_loopback(host, loopback):
    assert demo_command.is_loopback(host) is loopback


def test_command_refuses_bad_options(model_dir, tmp_path, capsys):
    assert cli.main(["demo", "--model", str(model_dir), "--max-steps", "0"]) == 2
    assert "--max-steps must be an int >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["demo", "--model", str(model_dir), "--port", "70000"]) == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err
    assert cli.main(["demo", "--model", str(tmp_path)]) == 2
    assert "is not a model directory" in capsys.readouterr().err


def test_command_serves_the_embedded_model_by_default(model_dir, tmp_path, monkeypatch, capsys):
    import matryoshka.commands.generate as generate_command
    import matryoshka.demo

    monkeypatch.setattr(generate_command, "default_model_dir", lambda: tmp_path / "not-installed")
    assert cli.main(["demo"]) == 2
    assert "the embedded default model is not installed" in capsys.readouterr().err

    page, built = RecordingPage(), {}
    monkeypatch.setattr(generate_command, "default_model_dir", lambda: model_dir)
    monkeypatch.setattr(
        matryoshka.demo, "build_demo",
        lambda pipe, limits, title=None, precision="fp32", guide=None: built.update(pipe=pipe) or page,
    )
    assert cli.main(["demo"]) == 0
    assert built["pipe"].config.model == MatryoshkaPipeline.from_pretrained(model_dir).config.model
    assert page.launched["server_name"] == "127.0.0.1" and page.launched["server_port"] == 7860


class RecordingPage:
    """Stands in for the gradio Blocks so the command's launch options can be read without serving."""

    def __init__(self) -> None:
        self.launched: dict = {}

    def launch(self, server_name: str, server_port: int, share: bool, **options) -> None:
        self.launched = {"server_name": server_name, "server_port": server_port, "share": share, **options}


@pytest.mark.parametrize(("host", "warned"), [("127.0.0.1", False), ("0.0.0.0", True)])
def test_command_launches_on_the_given_host_and_warns_when_exposed(model_dir, monkeypatch, capsys, host, warned):
    import matryoshka.demo

    page = RecordingPage()
    built = {}

    def fake_build(pipe, limits, title=None, precision="fp32", guide=None):
        built.update(pipe=pipe, limits=limits, precision=precision)
        return page

    monkeypatch.setattr(matryoshka.demo, "build_demo", fake_build)
    argv = ["demo", "--model", str(model_dir), "--port", "7999", "--max-images", "2", "--host", host]
    assert cli.main(argv) == 0
    assert page.launched["server_name"] == host and page.launched["server_port"] == 7999
    assert page.launched["share"] is False
    assert built["limits"] == DemoLimits(max_steps=100, max_images=2, max_prompt_chars=300)
    assert isinstance(built["pipe"], MatryoshkaPipeline)
    assert built["precision"] == "fp32"
    err = capsys.readouterr().err
    assert ("no authentication" in err) is warned
