"""`matryoshka demo` served for real: a subprocess on a free localhost port with a tiny random model,
driven over its HTTP API (server-side refusals, concurrent clients) and in headless Chromium (type a
prompt, press Generate, wait for the images of every level, take a screenshot).

The browser test needs Debian's chromium and chromium-driver (scripts/setup.sh installs them when run as
root) and selenium; it is skipped, with the reason, only when the browser or its driver is absent.
Set MATRYOSHKA_DEMO_SCREENSHOT=path to also save the screenshot there (docs/demo_screenshot.png).

Marked slow: starting the server (import gradio, load MiniLM, bind) takes 15-25 s on a busy 2-core
machine, so the module takes 30-40 s in all although each request is well under a second.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from matryoshka.diffusion import DiffusionConfig
from matryoshka.model_dir import MDMConfig, save_model_dir
from matryoshka.models import LevelConfig, ModelConfig, NestedUNet

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
START_TIMEOUT_S = 120  # import gradio + load MiniLM + bind, on a busy 2-core machine
REQUEST_TIMEOUT_S = 60
pytestmark = pytest.mark.slow
MAX_STEPS, MAX_IMAGES, MAX_PROMPT_CHARS = 30, 3, 80
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,1000",
]


def write_tiny_text_model(directory: Path) -> Path:
    """32 over 16 with MiniLM conditioning (bundled offline); random but non-zero adapters."""
    outer = LevelConfig(channels=[8, 8], num_res_blocks=[1, 1], norm_groups=4, temb_dim=32)
    core = LevelConfig(
        channels=[8, 16], num_res_blocks=[1, 1], attention_layers=[0, 1], num_heads=2, norm_groups=4, temb_dim=32
    )
    model_config = ModelConfig(levels=[outer, core], image_size=32, in_channels=1, text_dim=384)
    torch.manual_seed(0)
    model = NestedUNet(model_config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    config = MDMConfig(model=model_config, diffusion=DiffusionConfig(), text_encoder="minilm")
    return save_model_dir(directory, model, config)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class DemoServer:
    def __init__(self, url: str, process: subprocess.Popen, log: Path) -> None:
        self.url, self.process, self.log = url, process, log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@contextmanager
def serve(root: Path, model_dir: Path) -> Iterator[DemoServer]:
    """`matryoshka demo --model MODEL_DIR` in a subprocess on a free port, until the block ends."""
    port = free_port()
    log = root / "server.log"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # a tiny model: extra threads only add contention on a shared CPU
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "GRADIO_TEMP_DIR": str(root / "gradio-tmp"),
    }
    command = [
        sys.executable, "-m", "matryoshka.cli", "demo", "--model", str(model_dir), "--port", str(port),
        "--max-steps", str(MAX_STEPS), "--max-images", str(MAX_IMAGES), "--max-prompt-chars", str(MAX_PROMPT_CHARS),
    ]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}/"
    demo = DemoServer(url, process, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the demo server exited with {process.returncode}:\n{demo.log_text()}")
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the demo server did not answer within {START_TIMEOUT_S} s:\n{demo.log_text()}")
            time.sleep(0.5)
        yield demo
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[DemoServer]:
    root = tmp_path_factory.mktemp("demo-server")
    with serve(root, write_tiny_text_model(root / "model")) as demo:
        yield demo


# ---- the HTTP API (what any client, not only the page, can send) -------------------------------------


def call(server: DemoServer, *data) -> tuple[str, list]:
    """Runs the page's "generate" event through gradio's REST API: ("complete", outputs) or ("error", message)."""
    endpoint = f"{server.url}gradio_api/call/generate"
    posted = httpx.post(endpoint, json={"data": list(data)}, timeout=REQUEST_TIMEOUT_S)
    posted.raise_for_status()
    event_id = posted.json()["event_id"]
    kind, payload = None, None
    with httpx.stream("GET", f"{endpoint}/{event_id}", timeout=REQUEST_TIMEOUT_S) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: ") and kind in ("complete", "error"):
                payload = line.removeprefix("data: ")
                break
    assert kind in ("complete", "error"), f"no result from the server:\n{server.log_text()}"
    return kind, json.loads(payload) if payload else None


def pixels(outputs: list) -> list[list]:
    """The galleries of a completed call as pixel arrays (the server writes them to its temp folder)."""
    return [[np.asarray(Image.open(item["image"]["path"])).tolist() for item in gallery] for gallery in outputs[:-1]]


def test_server_refuses_bad_requests_and_keeps_serving(server):
    # prompt, negative, steps, guidance, seed, sampler, images, guidance interval, rescale, autoguidance, LoRA
    good = ("a red sneaker", "", 3, 5.0, 1, "ddim", 2, "", 0, False, 1.0)
    # (request, acceptable messages): gradio >= 6 checks slider/number/dropdown ranges itself before our
    # function runs (older gradio does not, and then our own check answers).
    refused = [
        (("x" * (MAX_PROMPT_CHARS + 1), *good[1:]), [f"prompt is {MAX_PROMPT_CHARS + 1} characters long"]),
        (("red \x00 shoe", *good[1:]), ["prompt contains a control character (U+0000"]),
        (("shoe", "\x1b[2J", *good[2:]), ["negative prompt contains a control character (U+001B"]),
        ((*good[:2], MAX_STEPS + 1, *good[3:]), ["greater than maximum", f"steps must be between 1 and {MAX_STEPS}"]),
        ((*good[:6], MAX_IMAGES + 1, *good[7:]), ["greater than maximum", "number of images must be between"]),
        ((*good[:4], -4, *good[5:]), ["less than minimum", "seed must be between 0"]),
        ((*good[:5], "euler-ancestral", *good[6:]), ["not in the list of choices", "unknown sampler"]),
        ((*good[:3], None, *good[4:]), ["component at index 3", "guidance must be a number"]),
        ((*good[:2], "3; rm -rf /", *good[3:]), ["component at index 2", "steps must be a whole number"]),
        (("x",), ["Received inputs"]),  # too few inputs
    ]
    for data, messages in refused:
        kind, payload = call(server, *data)
        assert kind == "error", f"{data!r} was served"
        assert any(message in str(payload) for message in messages), f"{data!r}: {payload}"
    # NaN is not JSON, but the server's parser accepts the literal: our check must refuse it.
    posted = httpx.post(
        f"{server.url}gradio_api/call/generate", timeout=REQUEST_TIMEOUT_S,
        content=b'{"data": ["shoe", "", 3, NaN, 1, "ddim", 1, "", 0, false, 1]}',
        headers={"content-type": "application/json"},
    )
    if posted.status_code == 200:
        event = posted.json()["event_id"]
        text = httpx.get(f"{server.url}gradio_api/call/generate/{event}", timeout=REQUEST_TIMEOUT_S).text
        assert "event: error" in text and "guidance must be a finite number" in text
    else:
        assert posted.status_code == 422
    kind, outputs = call(server, *good)
    assert kind == "complete", outputs
    assert [len(gallery) for gallery in outputs[:-1]] == [2, 2]
    assert outputs[-1].startswith("seed 1 · 3 ddim steps")
    assert server.process.poll() is None


def test_concurrent_clients_get_their_own_images(server):
    jobs = [("a bag", "", 3, 4.0, seed, "ddim", 1 + seed % 2, "", 0, False, 1.0) for seed in range(4)]
    expected = {}
    for job in jobs:
        kind, outputs = call(server, *job)
        assert kind == "complete", outputs
        expected[job] = pixels(outputs)
    results, errors = {}, []

    def client(job) -> None:
        try:
            kind, outputs = call(server, *job)
            assert kind == "complete", outputs
            results[job] = pixels(outputs)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=client, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=REQUEST_TIMEOUT_S * 2)
    assert not errors, errors
    assert results == expected


# ---- the page in headless Chromium --------------------------------------------------------------------


def _browser(tmp_path: Path):
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    # An explicit driver path: selenium must never try to download one.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    return driver


def test_page_generates_every_level_in_headless_chromium(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser(tmp_path)
    try:
        wait = WebDriverWait(driver, REQUEST_TIMEOUT_S)
        driver.get(server.url)
        prompt = wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
        assert "Matryoshka" in driver.title
        labels = driver.find_element(By.TAG_NAME, "body").text
        assert "Level 0: 32x32 (output)" in labels and "Level 1: 16x16 (core)" in labels
        prompt.send_keys("a red sneaker")
        driver.find_element(By.CSS_SELECTOR, "#generate").click()

        def finished(driver) -> str | bool:
            value = driver.find_element(By.CSS_SELECTOR, "#info textarea").get_attribute("value") or ""
            return value if value.startswith("seed ") else False

        info = wait.until(finished)
        assert f"{min(50, MAX_STEPS)} ddim steps" in info and "2 image(s)" in info  # the model's settings, capped
        for level in (0, 1):
            images = wait.until(
                lambda driver, level=level: driver.find_elements(By.CSS_SELECTOR, f"#level-{level} img") or False
            )
            # Every shown image really loaded (decoded, non-empty), enlarged to whole pixels for display.
            widths = [driver.execute_script("return arguments[0].naturalWidth", image) for image in images]
            assert widths and all(width == 192 for width in widths), widths
        screenshot = tmp_path / "demo_screenshot.png"
        assert driver.save_screenshot(str(screenshot))
        shot = Image.open(screenshot)
        assert shot.size[0] >= 1000 and np.asarray(shot.convert("L")).std() > 10  # not a blank page
        if os.environ.get("MATRYOSHKA_DEMO_SCREENSHOT"):
            shutil.copyfile(screenshot, os.environ["MATRYOSHKA_DEMO_SCREENSHOT"])

        # A refused request (a control character no keyboard types: set through the DOM) shows the
        # server's reason on the page instead of breaking it.
        driver.execute_script(
            "const box = arguments[0]; box.value = 'red \\u0007 shoe';"
            "box.dispatchEvent(new Event('input', {bubbles: true}));",
            prompt,
        )
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        refusal = "Request refused: prompt contains a control character (U+0007"
        wait.until(lambda driver: refusal in driver.find_element(By.TAG_NAME, "body").text)
    finally:
        driver.quit()
    assert server.process.poll() is None, server.log_text()


def write_tiny_video_model(directory: Path) -> Path:
    """4 frames of 16 px over 4 frames of 8 px, MiniLM captions; random but non-zero adapters."""
    outer = LevelConfig(channels=[8, 8], num_res_blocks=[1, 1], norm_groups=4, temb_dim=32, temporal_conv=True)
    core = LevelConfig(channels=[8, 16], num_res_blocks=[1, 1], attention_layers=[0, 1], num_heads=2, norm_groups=4,
                       temb_dim=32, temporal_attention_layers=[1, 1])
    model_config = ModelConfig(levels=[outer, core], image_size=16, in_channels=1, text_dim=384, num_frames=4,
                               temporal_ratios=[1])
    torch.manual_seed(0)
    model = NestedUNet(model_config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    config = MDMConfig(model=model_config, diffusion=DiffusionConfig(), text_encoder="minilm")
    return save_model_dir(directory, model, config)


def test_the_page_plays_a_video_models_clips_at_every_level(tmp_path_factory, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    root = tmp_path_factory.mktemp("video-demo")
    with serve(root, write_tiny_video_model(root / "model")) as demo:
        driver = _browser(tmp_path)
        try:
            wait = WebDriverWait(driver, REQUEST_TIMEOUT_S)
            driver.get(demo.url)
            prompt = wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
            prompt.send_keys("a bag sliding to the left")
            driver.find_element(By.CSS_SELECTOR, "#generate").click()
            wait.until(lambda d: (d.find_element(By.CSS_SELECTOR, "#info textarea").get_attribute("value") or "")
                       .startswith("seed "))
            for level in (0, 1):
                image = wait.until(lambda d, level=level: next(
                    (i for i in d.find_elements(By.CSS_SELECTOR, f"#level-{level} img")
                     if ".gif" in (i.get_attribute("src") or "")), False))
                assert driver.execute_script("return arguments[0].naturalWidth", image) > 0
                source = httpx.get(image.get_attribute("src"), timeout=REQUEST_TIMEOUT_S).content
                frames = Image.open(__import__("io").BytesIO(source))
                assert frames.format == "GIF" and getattr(frames, "n_frames", 1) == 4  # the clip plays
        finally:
            driver.quit()
        assert demo.process.poll() is None, demo.log_text()
