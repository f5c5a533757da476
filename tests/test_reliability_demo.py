"""The demo under hostile input, beyond tests/test_demo.py (which has the field-by-field refusals, the
lock and concurrent good requests) and tests/test_demo_browser.py (the same over HTTP): megabyte
prompts are refused at once, by their length, before any per-character work or any model call; and
a burst of concurrent requests, most of them bad, neither crashes, blocks nor mixes the good ones'
images.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from matryoshka.demo import DemoLimits, DemoRequestError, generate_request, pipeline_lock, stream_request
from matryoshka.diffusion import DiffusionConfig
from matryoshka.model_dir import MDMConfig, save_model_dir
from matryoshka.models import LevelConfig, ModelConfig, NestedUNet
from matryoshka.pipeline import MatryoshkaPipeline

LIMITS = DemoLimits(max_steps=6, max_images=2, max_prompt_chars=40)
CLASSES = ["boot", "shirt", "bag"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> MatryoshkaPipeline:
    """A random class-conditional 16-over-8 model (no text encoder to load)."""
    outer = LevelConfig(channels=[8, 8], num_res_blocks=[1, 1], norm_groups=4, temb_dim=32)
    core = LevelConfig(channels=[8, 8], num_res_blocks=[1, 1], norm_groups=4, temb_dim=32)
    model_config = ModelConfig(levels=[outer, core], image_size=16, in_channels=1, num_classes=len(CLASSES))
    config = MDMConfig(model=model_config, diffusion=DiffusionConfig(), class_names=CLASSES)
    torch.manual_seed(0)
    model = NestedUNet(model_config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    directory = save_model_dir(tmp_path_factory.mktemp("demo") / "model", model, config)
    return MatryoshkaPipeline.from_pretrained(directory)



def fields(prompt: str, steps: int, guidance: float, seed: int, n: int) -> dict:
    return {"prompt": prompt, "steps": steps, "guidance": guidance, "seed": seed, "num_images": n}

def request(pipe, prompt="boot", negative="", steps=3, guidance=2.0, seed=0, sampler="ddim", n=1):
    fields = {"prompt": prompt, "negative_prompt": negative, "steps": steps, "guidance": guidance, "seed": seed,
              "sampler": sampler, "num_images": n}
    return generate_request(pipe, fields, LIMITS)


def pixels(images_per_level) -> list:
    return [[np.asarray(image).tolist() for image in level] for level in images_per_level]


HUGE = 10_000_000


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt": "x" * (HUGE - 1) + "\x00"}, f"prompt is {HUGE} characters long; the limit is 40"),
        ({"prompt": " " * (HUGE - 4) + "boot"}, f"prompt is {HUGE} characters long; the limit is 40"),
        ({"negative": "\x1b" * HUGE}, f"negative prompt is {HUGE} characters long; the limit is 40"),
        ({"prompt": b"x" * (HUGE - 1) + b"\xff"}, f"prompt is {HUGE} bytes long; the limit is 40"),
    ],
    ids=["control-character-at-the-end", "whitespace-padding", "escape-flood", "bytes-invalid-at-the-end"],
)
def test_megabyte_prompts_are_refused_by_length_before_any_work(pipe, change, message):
    """The refusal names the length, not what a character-by-character scan would have found at the
    end of the text: the scan never ran (and the model never ran)."""
    calls = [0]
    handle = pipe.model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        with pytest.raises(DemoRequestError) as info:
            request(pipe, **change)
    finally:
        handle.remove()
    assert str(info.value) == message
    assert calls[0] == 0 and not pipeline_lock(pipe).locked()


def test_prompts_padded_with_some_whitespace_still_fit(pipe):
    """The early length check is loose enough for ordinary padding: it is the trimmed prompt that counts."""
    padded = request(pipe, "   boot \n\n\t " + " " * 100)
    assert pixels(padded[0]) == pixels(request(pipe, "boot")[0])


def test_a_burst_of_mostly_bad_concurrent_requests_neither_crashes_nor_mixes(pipe):
    good = [("boot", 1), ("shirt", 2), ("bag", 3), ("boot", 4)]
    expected = {job: pixels(request(pipe, job[0], seed=job[1])[0]) for job in good}
    bad = [
        {"prompt": "x" * HUGE}, {"prompt": "boot", "guidance": float("nan")}, {"prompt": "hat"},
        {"prompt": "boot", "steps": 10**9}, {"prompt": "boot", "n": 99}, {"prompt": b"\xff\xfe"},
        {"prompt": "boot", "seed": -5}, {"prompt": "boot", "sampler": "rm -rf /"}, {"prompt": "boot", "negative": "x"},
        {"prompt": ["boot"]},
    ] * 2
    results: dict = {}
    refused: list[str] = []
    unexpected: list[BaseException] = []
    start = threading.Barrier(len(good) * 2 + len(bad))

    def good_call(job, streamed: bool) -> None:
        try:
            start.wait(timeout=60)
            if streamed:
                *_, (images, _, _) = stream_request(pipe, fields(job[0], 3, 2.0, job[1], 1), LIMITS)
            else:
                images, _ = request(pipe, job[0], seed=job[1])
            results[job, streamed] = pixels(images)
        except BaseException as error:  # noqa: BLE001 - reported below
            unexpected.append(error)

    def bad_call(change) -> None:
        try:
            start.wait(timeout=60)
            request(pipe, **change)
            unexpected.append(AssertionError(f"served {str(change)[:60]}"))
        except DemoRequestError as error:
            refused.append(str(error))
        except BaseException as error:  # noqa: BLE001
            unexpected.append(error)

    threads = [threading.Thread(target=good_call, args=(job, s)) for job in good for s in (False, True)]
    threads += [threading.Thread(target=bad_call, args=(change,)) for change in bad]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not unexpected, unexpected
    assert not any(thread.is_alive() for thread in threads), f"stuck after {time.monotonic() - began:.0f} s"
    assert len(refused) == len(bad)
    assert results == {(job, s): expected[job] for job in good for s in (False, True)}
    assert not pipeline_lock(pipe).locked()
    assert pixels(request(pipe, "bag", seed=9)[0])  # and it still serves


def test_a_request_that_fails_inside_the_pipeline_releases_the_lock(pipe, monkeypatch):
    """An error in the middle of sampling (here: the network raises) is the caller's, not the server's."""
    original = pipe.model.forward

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(pipe.model, "forward", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        request(pipe)
    assert not pipeline_lock(pipe).locked()
    monkeypatch.setattr(pipe.model, "forward", original)
    assert pixels(request(pipe)[0])
