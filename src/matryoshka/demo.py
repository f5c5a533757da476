"""`matryoshka demo`: a local gradio page over a `MatryoshkaPipeline`.

Two layers, so that everything a request can do is testable without a browser:

* `generate_request(pipe, fields, limits)` validates one request (a mapping of its fields) against
  `DemoLimits` (steps, image count, prompt length, characters, finite numbers) and runs the pipeline
  under a lock held per pipeline, so concurrent callers are served one at a time and never see each other's images.
  Bad requests raise `DemoRequestError` (a ValueError) whose message names the field.
* `build_demo(pipe, limits)` lays out the page: inputs, one gallery per pyramid level (highest
  resolution first), denoising progress (gr.Progress plus the x0 estimates of every level streamed
  as previews), and a queue of concurrency 1. gradio is imported only here (the `demo` extra).
"""

from __future__ import annotations

import inspect
import math
import queue
import threading
import time
import unicodedata
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from matryoshka.data import tensor_to_pil
from matryoshka.guidance import GuidanceInterval
from matryoshka.pipeline import MatryoshkaPipeline, available_samplers
from matryoshka.typed_config import require

if TYPE_CHECKING:
    import gradio

MAX_SEED = 2**63 - 1
# Line breaks and tabs are ordinary whitespace in a prompt; every other control character is refused.
_ALLOWED_CONTROLS = frozenset("\t\n\r")
# Displayed images are enlarged (nearest neighbour, whole multiples) to at least this side in pixels.
DISPLAY_SIDE = 192

StepHook = Callable[[int, int, list[torch.Tensor]], None]
"""on_step(step, total, x0): after denoising step `step` of `total` (1-based), the clean estimate of
every level, highest first, as (N, C, S_r, S_r) CPU tensors in [-1, 1]."""


class DemoRequestError(ValueError):
    """A request the demo refuses; the message names the field and the allowed range."""


class DemoCancelled(RuntimeError):
    """Raised from the step hook to stop a request whose page went away."""


@dataclass
class DemoLimits:
    """What one request may ask for; enforced by `generate_request` on the server."""

    max_steps: int = 100
    max_images: int = 4
    max_prompt_chars: int = 300
    max_guidance: float = 30.0

    def validate(self) -> None:
        for name in ("max_steps", "max_images", "max_prompt_chars"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "must be an int >= 1")
        require(
            isinstance(self.max_guidance, int | float) and math.isfinite(self.max_guidance) and self.max_guidance >= 0,
            "max_guidance",
            "must be a finite number >= 0",
        )


@dataclass
class DemoRequest:
    """A validated request: what `generate_request` passes to the pipeline."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    seed: int
    sampler: str
    num_images: int
    guidance_interval: tuple[float, float] | None = None  # in sigma; None = every step
    guidance_rescale: float = 0.0
    autoguidance: bool = False  # guide with the demo's guide model instead of the unconditional branch
    lora_scale: float = 1.0  # the weight of every LoRA adapter the demo serves (0 = the model without them)


# What a request may carry, and the value a missing field takes (seed None: a random seed; steps, guidance
# and sampler: the model's recommended settings, `config.sampling`).
REQUEST_DEFAULTS: dict[str, Any] = {
    "prompt": "", "negative_prompt": "", "steps": 20, "guidance": 3.0, "seed": None, "sampler": "ddim",
    "num_images": 1, "guidance_interval": "", "guidance_rescale": 0.0, "autoguidance": False, "lora_scale": 1.0,
}


# ---- validation --------------------------------------------------------------------------------------


def _clean_text(value: Any, field: str, max_chars: int) -> str:
    """A prompt as a str: UTF-8 bytes are decoded, None is "", whitespace is trimmed."""
    if value is None:
        return ""
    # The checks below walk the text one character at a time (in Python): refuse a text far over the
    # limit before that, so that a huge request costs nothing. Joining whitespace can shorten a prompt,
    # but no real one to a quarter.
    if isinstance(value, str | bytes | bytearray) and len(value) > 4 * max_chars + 64:
        unit = "characters" if isinstance(value, str) else "bytes"
        raise DemoRequestError(f"{field} is {len(value)} {unit} long; the limit is {max_chars}")
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            raise DemoRequestError(f"{field} is not valid UTF-8 (byte {error.start})") from None
    if not isinstance(value, str):
        raise DemoRequestError(f"{field} must be text, got {type(value).__name__}")
    for position, char in enumerate(value):
        category = unicodedata.category(char)
        if category == "Cs":  # a lone surrogate: what undecodable bytes become (surrogateescape)
            raise DemoRequestError(f"{field} is not valid UTF-8 (an unpaired surrogate at character {position})")
        if category == "Cc" and char not in _ALLOWED_CONTROLS:
            raise DemoRequestError(f"{field} contains a control character (U+{ord(char):04X} at character {position})")
    value = " ".join(value.split()) if any(c in value for c in _ALLOWED_CONTROLS) else value.strip()
    if len(value) > max_chars:
        raise DemoRequestError(f"{field} is {len(value)} characters long; the limit is {max_chars}")
    return value


def _whole_number(value: Any, field: str) -> int:
    """An int from an int, an integral float (gradio numbers arrive as floats) or a decimal string."""
    if isinstance(value, bool) or value is None:
        raise DemoRequestError(f"{field} must be a whole number, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if not text.lstrip("+-").isdigit() or not text.isascii():
            raise DemoRequestError(f"{field} must be a whole number, got {value!r}")
        return int(text)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise DemoRequestError(f"{field} must be a whole number, got {value!r}")
        return int(value)
    raise DemoRequestError(f"{field} must be a whole number, got {type(value).__name__}")


def _in_range(value: int, field: str, low: int, high: int) -> int:
    if not low <= value <= high:
        shown = str(value) if len(str(value)) <= 24 else f"a {len(str(abs(value)))}-digit number"
        raise DemoRequestError(f"{field} must be between {low} and {high}, got {shown}")
    return value


def validate_request(
    pipe: MatryoshkaPipeline, fields: Mapping[str, Any], limits: DemoLimits, guide: MatryoshkaPipeline | None = None
) -> DemoRequest:
    """Checks one request (a mapping of REQUEST_DEFAULTS' fields; missing ones take those defaults) against
    the limits and the model; raises DemoRequestError naming the field.

    seed None (or "") draws a random seed, which the result's info reports. guide: the demo's
    autoguidance model, if it has one."""
    unknown = sorted(set(fields) - set(REQUEST_DEFAULTS))
    if unknown:
        raise DemoRequestError(f"unknown request field {unknown[0]!r}; known: {', '.join(REQUEST_DEFAULTS)}")
    recommended = pipe.config.sampling
    scale = recommended.guidance_scale
    model_defaults = {"steps": recommended.num_inference_steps, "sampler": recommended.sampler,
                      "guidance": scale[0] if isinstance(scale, list) else scale}
    values = {**REQUEST_DEFAULTS, **model_defaults, **fields}
    prompt, negative_prompt, steps = values["prompt"], values["negative_prompt"], values["steps"]
    guidance, seed, sampler, num_images = values["guidance"], values["seed"], values["sampler"], values["num_images"]
    prompt = _clean_text(prompt, "prompt", limits.max_prompt_chars)
    negative_prompt = _clean_text(negative_prompt, "negative prompt", limits.max_prompt_chars)
    max_steps = min(limits.max_steps, pipe.schedule.num_train_steps)
    steps = _in_range(_whole_number(steps, "steps"), "steps", 1, max_steps)
    num_images = _in_range(_whole_number(num_images, "number of images"), "number of images", 1, limits.max_images)

    if isinstance(guidance, bool) or not isinstance(guidance, int | float | str):
        raise DemoRequestError(f"guidance must be a number, got {guidance!r}")
    try:
        guidance = float(guidance)
    except ValueError:
        raise DemoRequestError(f"guidance must be a number, got {guidance!r}") from None
    if not math.isfinite(guidance) or not 0 <= guidance <= limits.max_guidance:
        raise DemoRequestError(f"guidance must be a finite number between 0 and {limits.max_guidance}, got {guidance}")

    if seed is None or (isinstance(seed, str) and not seed.strip()):
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    seed = _in_range(_whole_number(seed, "seed"), "seed", 0, MAX_SEED)

    if not isinstance(sampler, str) or sampler not in available_samplers():
        raise DemoRequestError(f"unknown sampler {sampler!r}; choose one of {', '.join(available_samplers())}")

    if not pipe.is_text_conditional:
        if negative_prompt:
            raise DemoRequestError("this model is not text-conditional: leave the negative prompt empty")
        if pipe.is_class_conditional:
            try:
                pipe.class_index(int(prompt) if prompt.isdigit() else prompt)
            except ValueError as error:
                raise DemoRequestError(f"prompt: this model is class-conditional: {error}") from None
        elif prompt:
            raise DemoRequestError("this model is unconditional: leave the prompt empty")
    interval = _interval(values["guidance_interval"], pipe)
    rescale = _number(values["guidance_rescale"], "guidance rescale", 0.0, 1.0)
    autoguidance = values["autoguidance"]
    if not isinstance(autoguidance, bool):
        raise DemoRequestError(f"autoguidance must be true or false, got {autoguidance!r}")
    if autoguidance and guide is None:
        raise DemoRequestError("autoguidance needs a guide model: start the demo with --guide-model DIR")
    lora_scale = _number(values["lora_scale"], "LoRA scale", 0.0, 2.0)
    return DemoRequest(prompt, negative_prompt, steps, guidance, seed, sampler, num_images, interval, rescale,
                       autoguidance, lora_scale)


def _number(value: Any, field: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise DemoRequestError(f"{field} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise DemoRequestError(f"{field} must be a number, got {value!r}") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise DemoRequestError(f"{field} must be a finite number between {low:g} and {high:g}, got {number}")
    return number


def _interval(value: Any, pipe: MatryoshkaPipeline) -> tuple[float, float] | None:
    """"LO,HI" in sigma (or empty: every step) -> (low, high)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise DemoRequestError(f"guidance interval must be text like 0.3,5 (sigma), got {value!r}")
    from matryoshka.guidance import parse_intervals

    try:
        interval = parse_intervals(value.strip(), "sigma", 1)
    except ValueError as error:
        raise DemoRequestError(f"guidance interval {value!r}: {error}") from None
    if not isinstance(interval, GuidanceInterval):
        return None
    return (interval.low, interval.high)


# ---- serving -----------------------------------------------------------------------------------------

# One lock per pipeline object: a model (and its tokenizer) serves one request at a time.
_LOCKS: weakref.WeakKeyDictionary[MatryoshkaPipeline, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def pipeline_lock(pipe: MatryoshkaPipeline) -> threading.Lock:
    """The lock every `generate_request` on `pipe` holds while it samples."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(pipe)
        if lock is None:
            lock = _LOCKS[pipe] = threading.Lock()
        return lock


def _to_unit_range(pyramid: list[torch.Tensor], signal_scales: list[float]) -> list[torch.Tensor]:
    """Sampler states/estimates live in each level's scaled signal space; images are in [-1, 1]."""
    return [(x.float() * scale).clip(-1, 1).cpu() for x, scale in zip(pyramid, signal_scales, strict=True)]


def generate_request(
    pipe: MatryoshkaPipeline,
    fields: Mapping[str, Any],
    limits: DemoLimits,
    on_step: StepHook | None = None,
    precision: str = "fp32",
    guide: MatryoshkaPipeline | None = None,
) -> tuple[list[list[Image.Image]], str]:
    """Validates a request, then generates `num_images` images for it.

    Returns (images_per_level, info): images_per_level[r][i] is image i at level r (highest resolution
    first, r = 0 is the output); info says the seed, steps, sampler, guidance and time taken.
    Raises DemoRequestError for a refused request (before any work), DemoCancelled if on_step raised it.
    """
    request = validate_request(pipe, fields, limits, guide)
    conditioning: dict[str, Any] = {}
    if pipe.is_text_conditional:
        conditioning = {"prompt": request.prompt, "negative_prompt": request.negative_prompt}
    elif pipe.is_class_conditional:
        conditioning = {"class_labels": int(request.prompt) if request.prompt.isdigit() else request.prompt}

    callback = None
    if on_step is not None:
        scales = pipe.schedule.signal_scales

        def callback(state) -> None:
            on_step(state.index + 1, state.total, _to_unit_range(state.x0, scales))  # network calls

    with pipeline_lock(pipe):
        adapters = _lora_names(pipe)
        if adapters:  # under the lock: the scale is the pipeline's state for this request
            pipe.set_adapters(adapters, [request.lora_scale] * len(adapters))
        started = time.perf_counter()
        output = pipe(
            **conditioning,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            sampler=request.sampler,
            generator=request.seed,
            num_images_per_prompt=request.num_images,
            output_levels=True,
            callback=callback,
            progress=False,
            precision=precision,
            guidance_interval=request.guidance_interval,
            guidance_rescale=request.guidance_rescale,
            guide_model=guide if request.autoguidance else None,
        )
        elapsed = time.perf_counter() - started
    assert output.levels is not None
    sizes = " / ".join(f"{s}x{s}" for s in pipe.config.model.sizes)
    extras = ""
    if request.guidance_interval is not None:
        extras += f" in sigma [{request.guidance_interval[0]:g}, {request.guidance_interval[1]:g}]"
    if request.guidance_rescale:
        extras += f", rescale {request.guidance_rescale:g}"
    if request.autoguidance:
        extras += " (autoguidance)"
    if _lora_names(pipe):
        extras += f", LoRA scale {request.lora_scale:g}"
    info = (
        f"seed {request.seed} · {request.steps} {request.sampler} steps · guidance {request.guidance:g}{extras} · "
        f"{request.num_images} image(s) · levels {sizes} · {elapsed:.1f} s"
    )
    if pipe.is_video:  # every level as one animated GIF of its clips side by side
        return video_levels(output.tensors), info
    return output.levels, info


def video_levels(tensors: list[torch.Tensor]) -> list[list[Path]]:
    """Clips of every level (N, C, T, S, S) -> one GIF per level (the clips tiled, enlarged for the page)."""
    import tempfile

    from matryoshka.video import save_video, tile_videos

    directory = Path(tempfile.mkdtemp(prefix="matryoshka-demo-"))
    paths = []
    for level, clips in enumerate(tensors):
        scale = max(1, DISPLAY_SIDE // clips.shape[-1])
        paths.append([save_video(tile_videos(clips), directory / f"level{level}.gif", upscale=scale)])
    return paths


# ---- the page ----------------------------------------------------------------------------------------


def _preview_image(sample: torch.Tensor) -> Image.Image:
    """An x0 estimate as a picture: an image (C, S, S), or a clip (C, T, S, S) as its frames side by side."""
    if sample.ndim == 4:
        return tensor_to_pil(torch.cat(list(sample.unbind(1)), dim=-1))
    return tensor_to_pil(sample)


def _lora_names(pipe: MatryoshkaPipeline) -> list[str]:
    if not any("lora_" in name for name, _ in pipe.model.named_parameters()):
        return []
    from matryoshka import lora

    return lora.adapter_names(pipe.model)


def display_image(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """Enlarges a small image by a whole factor (nearest neighbour) so its pixels stay crisp on screen."""
    factor = max(1, math.ceil(side / max(image.size)))
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _gallery_items(images: list[Image.Image], seed_note: str = "") -> list[tuple[Image.Image, str]]:
    return [(display_image(image), f"#{i + 1}{seed_note}") for i, image in enumerate(images)]


def _level_labels(pipe: MatryoshkaPipeline) -> list[str]:
    sizes = pipe.config.model.sizes
    labels = []
    for level, size in enumerate(sizes):
        role = "output" if level == 0 else ("core" if level == len(sizes) - 1 else "inner level")
        labels.append(f"Level {level}: {size}x{size} ({role})")
    return labels


def stream_request(
    pipe: MatryoshkaPipeline,
    fields: Mapping[str, Any],
    limits: DemoLimits,
    progress: Callable[[tuple[int, int], str], Any] | None = None,
    precision: str = "fp32",
    guide: MatryoshkaPipeline | None = None,
) -> Iterator[tuple[list[list[Image.Image]], str, bool]]:
    """Runs `generate_request` in a worker thread and yields (images_per_level, info, done): the x0
    previews of the latest step while denoising (done False), then the result (done True).

    Closing the iterator early (the page went away) stops the worker at its next step.
    DemoRequestError and pipeline errors are re-raised here, in the caller's thread."""
    updates: queue.Queue = queue.Queue()
    cancelled = threading.Event()
    outcome: dict[str, Any] = {}

    def on_step(step: int, total: int, x0: list[torch.Tensor]) -> None:
        if cancelled.is_set():
            raise DemoCancelled("the request was cancelled")
        updates.put((step, total, x0))

    def work() -> None:
        try:
            outcome["result"] = generate_request(
                pipe, fields, limits, on_step=on_step, precision=precision, guide=guide
            )
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = error
        finally:
            updates.put(None)

    worker = threading.Thread(target=work, name="matryoshka-demo-request", daemon=True)
    worker.start()
    try:
        finished = False
        while not finished:
            item = updates.get()
            # Only the newest preview is worth sending: skip the ones the page could not keep up with.
            while item is not None:
                try:
                    newer = updates.get_nowait()
                except queue.Empty:
                    break
                item = newer
            if item is None:
                finished = True
                break
            step, total, x0 = item
            if progress is not None:
                progress((step, total), f"denoising step {step}/{total}")
            previews = [[_preview_image(image) for image in level] for level in x0]
            yield previews, f"denoising: step {step}/{total} (x0 estimates)", False
        worker.join()
    finally:
        cancelled.set()
    if "error" in outcome:
        raise outcome["error"]
    images, info = outcome["result"]
    yield images, info, True


def build_demo(
    pipe: MatryoshkaPipeline, limits: DemoLimits | None = None, title: str | None = None, precision: str = "fp32",
    guide: MatryoshkaPipeline | None = None,
) -> gradio.Blocks:
    """The page: prompt, negative prompt, steps, guidance (scale, interval, rescale, and autoguidance when
    a guide model is given), seed, sampler, number of images; a gallery per level. The queue (concurrency
    1) is configured here; call `.launch(...)` on the result. `precision`: the pipeline's, for every
    request ("bf16": autocast)."""
    import gradio as gr

    limits = limits or DemoLimits()
    limits.validate()
    samplers = available_samplers()
    labels = _level_labels(pipe)
    title = title or "Matryoshka Diffusion"
    max_steps = min(limits.max_steps, pipe.schedule.num_train_steps)
    if pipe.is_text_conditional:
        prompt_label, prompt_hint = "Prompt", "a photo of a sneaker"
    elif pipe.is_class_conditional:
        names = ", ".join(pipe.config.class_names or [str(i) for i in range(pipe.config.model.num_classes)])
        prompt_label, prompt_hint = f"Class ({names})", (pipe.config.class_names or ["0"])[0]
    else:
        prompt_label, prompt_hint = "Prompt (unconditional model: leave empty)", ""

    names = ("prompt", "negative_prompt", "steps", "guidance", "seed", "sampler", "num_images",
             "guidance_interval", "guidance_rescale", "autoguidance", "lora_scale")

    def serve(*values, progress=gr.Progress()):
        try:
            for images, info, _done in stream_request(
                pipe, dict(zip(names, values, strict=True)), limits,
                progress=lambda fraction, desc: progress(fraction, desc=desc), precision=precision, guide=guide,
            ):
                if pipe.is_video:  # one picture per level: x0 frames while denoising, then the GIF
                    yield (*[level[0] if isinstance(level[0], Path) else display_image(level[0])
                             for level in images], info)
                else:
                    yield (*[_gallery_items(level) for level in images], info)
        except DemoRequestError as error:
            raise gr.Error(f"Request refused: {error}") from None
        except (ValueError, TypeError) as error:
            raise gr.Error(f"Generation failed: {error}") from None

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {title}\nNested multi-resolution pixel diffusion: every level of the pyramid is denoised jointly, "
            "from the core up to the output. Limits: "
            f"{max_steps} steps, {limits.max_images} images, {limits.max_prompt_chars} characters."
        )
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(
                    label=prompt_label, placeholder=prompt_hint, max_length=limits.max_prompt_chars,
                    elem_id="prompt", interactive=True,
                )
                negative = gr.Textbox(
                    label="Negative prompt", placeholder="(empty: unconditional branch)",
                    max_length=limits.max_prompt_chars, elem_id="negative-prompt",
                    visible=pipe.is_text_conditional,
                )
                recommended = pipe.config.sampling  # the model's own settings start the page
                default_guidance = recommended.guidance_scale
                if isinstance(default_guidance, list):
                    default_guidance = default_guidance[0]
                steps = gr.Slider(1, max_steps, value=min(recommended.num_inference_steps, max_steps), step=1,
                                  label="Steps", elem_id="steps")
                guidance = gr.Slider(
                    0, limits.max_guidance, value=min(default_guidance, limits.max_guidance), step=0.5,
                    label="Guidance scale", elem_id="guidance",
                )
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed (empty: random)", elem_id="seed")
                    default_sampler = recommended.sampler if recommended.sampler in samplers else samplers[0]
                    sampler = gr.Dropdown(samplers, value=default_sampler, label="Sampler", elem_id="sampler")
                num_images = gr.Slider(
                    1, limits.max_images, value=min(2, limits.max_images), step=1, label="Images", elem_id="num-images"
                )
                with gr.Accordion("Guidance options", open=False):
                    interval = gr.Textbox(
                        label="Guidance interval LO,HI in sigma (empty: every step)", placeholder="0.3,5",
                        elem_id="guidance-interval",
                    )
                    rescale = gr.Slider(0, 1, value=0, step=0.05, label="Guidance rescale", elem_id="guidance-rescale")
                    autoguidance = gr.Checkbox(
                        value=False, label="Autoguidance (guide with the weaker model)", elem_id="autoguidance",
                        visible=guide is not None,
                    )
                    lora_scale = gr.Slider(0, 2, value=1, step=0.05, label="LoRA scale", elem_id="lora-scale",
                                           visible=bool(_lora_names(pipe)))
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                info = gr.Textbox(label="Status", interactive=False, elem_id="info")
                # One row of max_images thumbnails in a ~800 px wide column, without empty space below.
                row_height = max(160, min(320, 800 // limits.max_images + 40))
                gallery_options: dict[str, Any] = {
                    "columns": limits.max_images, "object_fit": "contain", "height": row_height,
                }
                if "fit_columns" in inspect.signature(gr.Gallery.__init__).parameters:
                    gallery_options["fit_columns"] = False  # gradio >= 6 stretches few images to the full width
                if pipe.is_video:  # animated GIFs (all clips of a level side by side) play in the page
                    galleries = [
                        gr.Image(label=label, type="filepath", elem_id=f"level-{level}", interactive=False,
                                 format="gif")
                        for level, label in enumerate(labels)
                    ]
                else:
                    galleries = [
                        gr.Gallery(
                            label=label, format="png", elem_id=f"level-{level}", interactive=False,
                            **gallery_options,
                        )
                        for level, label in enumerate(labels)
                    ]
        inputs = [prompt, negative, steps, guidance, seed, sampler, num_images, interval, rescale, autoguidance,
                  lora_scale]
        outputs = [*galleries, info]
        gr.on(
            [button.click, prompt.submit], serve, inputs, outputs,
            api_name="generate", concurrency_limit=1, concurrency_id="model",
        )
    # One model, one request at a time; a bounded waiting line so a flood is refused, not buffered.
    demo.queue(max_size=16, default_concurrency_limit=1)
    return demo
