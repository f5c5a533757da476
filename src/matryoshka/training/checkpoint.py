"""Training checkpoints: safetensors for tensors, JSON for the rest, written atomically.

Layout of one checkpoint, `DIR/checkpoints/step-0001000/`:
    model.safetensors      live weights
    ema.safetensors        EMA weights
    optimizer.safetensors  optimizer state tensors, keyed "<parameter name>/<state name>"
    state.json             step, stage, data position, RNG states, EMA count, optimizer param groups,
                           the run's config, and the list of files above

Damage after the write is found, not trusted: state.json records the size and SHA-256 of every file,
and state.sha256 the SHA-256 of state.json; `find_intact` skips a checkpoint whose files no longer match
(truncated, bytes flipped) for the newest one that does, and says which it skipped and why.

A checkpoint is written into a hidden temporary directory, every file and the directory are fsynced,
and only then is it renamed to its final name; the `latest` pointer file is replaced atomically
last. A run killed at any moment therefore leaves either a complete checkpoint or a temporary
directory that `find_latest` ignores. A write that fails (disk full, ...) removes its temporary
directory and raises `CheckpointWriteError`, leaving the previous checkpoints and `latest` as they were.
Nothing here unpickles: loading never executes code.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from matryoshka.atomic import atomic_write_text, file_digest

LATEST = "latest"
STATE_FILE = "state.json"
STATE_DIGEST_FILE = "state.sha256"
_NAME = re.compile(r"^step-(\d{7,})$")
_TEMP_PREFIX = ".tmp-"


class RunWriteError(OSError):
    """Something a run writes (a checkpoint, the model export, the metrics log) could not be written (disk
    full, permissions, ...); the message says what, why, and that the run can be resumed."""


class CheckpointWriteError(RunWriteError):
    """A checkpoint could not be written (disk full, permissions, ...); the earlier ones are intact."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def step_of(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (so that a rename inside it is durable)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some filesystems / platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_complete(path: Path) -> bool:
    """A final-named checkpoint directory whose state.json exists and lists files that all exist."""
    if step_of(path) is None or not path.is_dir():
        return False
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all((path / name).is_file() for name in state.get("files", []))


def _sha256(path: Path) -> str:
    return file_digest(path, "sha256")


def damage(path: Path) -> str | None:
    """Why a complete checkpoint is damaged (a file's size or checksum changed since it was written), or
    None if it is intact. Checkpoints written before checksums were recorded are taken as intact."""
    digest_file = path / STATE_DIGEST_FILE
    if digest_file.is_file():
        recorded = digest_file.read_text(encoding="utf-8").strip()
        if _sha256(path / STATE_FILE) != recorded:
            return f"{STATE_FILE} does not match its checksum"
    try:
        state = read_state(path)
    except (OSError, ValueError) as error:
        return f"{STATE_FILE} is unreadable ({error})"
    for name, expected in (state.get("checksums") or {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{name} is {size} bytes, {expected['size']} when written (truncated?)"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not match its checksum (bytes changed since it was written)"
    return None


def find_intact(root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint that is not damaged (the one `latest` names first), and the newer
    ones skipped as damaged, each with the reason."""
    root = Path(root)
    candidates = list_checkpoints(root)[::-1]
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8").strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    skipped = []
    for candidate in candidates:
        reason = damage(candidate)
        if reason is None:
            return candidate, skipped
        skipped.append((candidate, reason))
    return None, skipped


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary and incomplete ones are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: step_of(p) or 0)


def find_latest(root: str | Path) -> Path | None:
    """The checkpoint named by `latest` if it is complete, else the newest complete one, else None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if is_complete(candidate):
            return candidate
    found = list_checkpoints(root)
    return found[-1] if found else None


def remove_stale_temporaries(root: str | Path) -> list[Path]:
    """Delete temporary directories left by killed runs (call before this run writes any)."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(_TEMP_PREFIX) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def write_checkpoint(
    root: str | Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write `<stem>.safetensors` for every entry of `tensors` and state.json, atomically.

    Returns the final directory. Older checkpoints beyond `keep_last` are deleted afterwards.
    """
    root = Path(root)
    name = checkpoint_name(step)
    temporary = root / f"{_TEMP_PREFIX}{name}-{os.getpid()}"
    try:
        final = _write_and_publish(root, name, temporary, tensors, {**state, "step": step})
    except OSError as err:
        shutil.rmtree(temporary, ignore_errors=True)  # a half-written directory only wastes space
        kept = find_latest(root)
        raise CheckpointWriteError(
            err.errno,
            f"could not write checkpoint {name} in {root}: {err.strerror or err}; "
            + (f"the last complete checkpoint is still {kept.name}" if kept else "there is no earlier checkpoint")
            + " (fix the cause, e.g. free some space, then continue with --resume)",
        ) from err
    prune(root, keep_last)
    return final


def _write_and_publish(
    root: Path, name: str, temporary: Path, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]
) -> Path:
    """Write everything into `temporary`, then rename it to `root/name` and point `latest` at it."""
    root.mkdir(parents=True, exist_ok=True)
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    files, checksums = [], {}
    for stem, state_dict in tensors.items():
        path = temporary / f"{stem}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(path))
        _fsync_path(path)
        files.append(path.name)
        checksums[path.name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    state = {**state, "files": files, "checksums": checksums}
    with open(temporary / STATE_FILE, "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    (temporary / STATE_DIGEST_FILE).write_text(_sha256(temporary / STATE_FILE) + "\n", encoding="utf-8")
    _fsync_path(temporary / STATE_DIGEST_FILE)
    _fsync_path(temporary)

    final = root / name
    if final.exists():  # the same step written again (a resumed run): swap it out, never half-replace
        old = root / f"{_TEMP_PREFIX}old-{name}-{os.getpid()}"
        os.rename(final, old)
        try:
            os.rename(temporary, final)
        except OSError:
            os.rename(old, final)  # put the earlier copy back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(temporary, final)
    _fsync_path(root)
    atomic_write_text(root / LATEST, name + "\n")
    _fsync_path(root)
    return final


def prune(root: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (never the one `latest` names)."""
    root = Path(root)
    latest = find_latest(root)
    for path in list_checkpoints(root)[:-keep_last]:
        if latest is None or path.resolve() != latest.resolve():
            # Renamed first, so that a run killed while deleting leaves a temporary (removed by the next
            # run), never a half-deleted directory under a checkpoint's name.
            doomed = root / f"{_TEMP_PREFIX}pruned-{path.name}-{os.getpid()}"
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def read_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))


def read_tensors(path: str | Path, stem: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / f"{stem}.safetensors"))


# ------------------------------------------------------------------------------------------------
# Optimizer state <-> (tensors, JSON)
def split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict keyed by parameter names (as torch.distributed.checkpoint gives it)
    -> tensors {"<param>/<name>": tensor} and the JSON-safe rest (scalars and param groups)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}/{name}"] = value
            else:
                scalars.setdefault(str(param), {})[name] = value
    groups = []
    for group in state_dict["param_groups"]:
        plain = {}
        for key, value in group.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            plain[key] = list(value) if isinstance(value, tuple) else value
        groups.append(plain)
    return tensors, {"scalars": scalars, "param_groups": groups}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `split_optimizer_state`."""
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        param, _, name = key.rpartition("/")
        state.setdefault(param, {})[name] = value
    for param, entries in meta.get("scalars", {}).items():
        state.setdefault(param, {}).update(entries)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------------------------------------
# RNG states <-> JSON
def _encode_bytes(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _decode_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def capture_rng_state() -> dict[str, Any]:
    """The python, numpy, torch (CPU) and CUDA generator states, JSON-safe."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _encode_bytes(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_encode_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_decode_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        saved = [_decode_bytes(s) for s in state["cuda"]]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)


__all__ = [
    "LATEST",
    "CheckpointWriteError",
    "RunWriteError",
    "capture_rng_state",
    "checkpoint_name",
    "damage",
    "find_intact",
    "find_latest",
    "is_complete",
    "join_optimizer_state",
    "list_checkpoints",
    "prune",
    "read_state",
    "read_tensors",
    "remove_stale_temporaries",
    "restore_rng_state",
    "split_optimizer_state",
    "write_checkpoint",
]
