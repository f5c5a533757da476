"""Data faults end to end, through `matryoshka train`: truncated and corrupt images, empty, non-UTF-8
and overlong captions, shards that end early or are missing. A few are skipped, counted and reported
(metrics and the end-of-run summary) and the run trains; past data.max_failure_ratio the run itself
stops with the FaultCounter's message and exit status 1, also when the fault is met in a DataLoader
worker process. (tests/test_data_faults.py covers the loaders one by one.)
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from matryoshka.cli import main
from matryoshka.data import write_shard
from matryoshka.training import read_metrics
from matryoshka.training.testing import tiny_config_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def image_bytes(seed: int, fmt: str = "PNG", side: int = 20) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(side, side), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    data = image_bytes(99, "JPEG", 64)
    return data[: len(data) // 2]


def good_files(root: Path, count: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (root / f"good{i:02d}.png").write_bytes(image_bytes(i))
        (root / f"good{i:02d}.txt").write_text(f"a thing number {i}", encoding="utf-8")


def bad_files(root: Path, copies: int = 1) -> None:
    """One of each failure an image folder can have, `copies` times."""
    for c in range(copies):
        (root / f"truncated{c}.jpg").write_bytes(truncated_jpeg())
        (root / f"noise{c}.png").write_bytes(os.urandom(300))
        (root / f"empty{c}.png").write_bytes(b"")
        (root / f"latin1_{c}.png").write_bytes(image_bytes(50 + c))
        (root / f"latin1_{c}.txt").write_bytes("une robe d'été".encode("latin-1"))


def train_cli(tmp_path: Path, overrides: list[str], capsys) -> tuple[int, str, str]:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(overrides)), encoding="utf-8")
    capsys.readouterr()
    code = main(["train", str(config), "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_few_bad_files_are_skipped_counted_and_reported(tmp_path, capsys):
    root = tmp_path / "images"
    good_files(root, 12)
    bad_files(root)  # 4 bad of 16 = 0.25
    (root / "good00.txt").write_text("x" * 2000, encoding="utf-8")  # overlong: kept, cut, noted
    (root / "good01.txt").write_text("  \n", encoding="utf-8")  # empty: kept (captions are optional here)
    # 16 files, 2 steps of 8: exactly one epoch, so every file is counted once.
    code, out, err = train_cli(
        tmp_path,
        ["data.dataset=folder", f"data.path={root}", "data.limit=null", "data.min_samples=16",
         "data.max_failure_ratio=0.3", "stages=[{levels: 2, steps: 2}]"],
        capsys,
    )
    assert code == 0, err
    assert (
        "data: 4 of 16 samples were bad and skipped (caption_not_utf8=1, corrupt_image=2, truncated_image=1); "
        "kept with notes: caption_truncated=1, empty_caption_kept=1"
    ) in out
    last = read_metrics(tmp_path / "run")[-1]
    assert last["data/failed"] == 4 and last["data/failure_ratio"] == 0.25
    assert last["data/corrupt_image"] == 2 and last["data/truncated_image"] == 1
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("workers", [0, 1], ids=["in-process", "in-a-worker"])
def test_mostly_bad_files_stop_the_run_with_the_fault_message(tmp_path, capsys, workers):
    root = tmp_path / "images"
    good_files(root, 3)
    bad_files(root, copies=3)  # 12 bad of 15
    code, out, err = train_cli(
        tmp_path,
        ["data.dataset=folder", f"data.path={root}", "data.limit=null", "data.min_samples=4",
         "data.max_failure_ratio=0.2", f"data.num_workers={workers}", "stages=[{levels: 2, steps: 5}]"],
        capsys,
    )
    assert code == 1
    assert err.startswith("matryoshka train: stopped: too many bad data samples: "), err
    assert "> max_failure_ratio 0.200" in err and "by kind: " in err and "Traceback" not in err
    assert not (tmp_path / "run" / "model").exists()  # stopped before any stage finished


def shard_sample(key: str, seed: int, caption: bytes | None = None) -> dict:
    sample = {"__key__": key, "png": image_bytes(seed)}
    sample["txt"] = f"item {key}".encode() if caption is None else caption
    return sample


def truncate_inside_last_member(path: Path) -> None:
    """Cut a tar in the middle of its last member's data (a copy that stopped early)."""
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    os.truncate(path, last.offset_data + last.size // 2)


def test_shards_that_end_early_or_are_missing_and_bad_captions_are_counted(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "part-0.tar", [shard_sample(f"a{i}", i) for i in range(8)])
    write_shard(shards / "part-1.tar", [
        *[shard_sample(f"b{i}", 10 + i) for i in range(6)],
        shard_sample("b-latin1", 20, "une robe d'été".encode("latin-1")),
        shard_sample("b-empty", 21, b"   "),
        shard_sample("b-long", 22, b"y" * 5000),
        {"__key__": "b-noise", "png": os.urandom(200), "txt": b"noise"},
    ])
    write_shard(shards / "part-2.tar", [shard_sample(f"c{i}", 30 + i) for i in range(6)])
    truncate_inside_last_member(shards / "part-2.tar")
    # part-3.tar is named by the pattern but does not exist.
    code, out, err = train_cli(
        tmp_path,
        ["data.dataset=shards", f"data.path={shards}/part-{{0..3}}.tar", "data.shuffle_buffer=4", "data.min_samples=12",
         "data.max_failure_ratio=0.4", "stages=[{levels: 2, steps: 4}]"],
        capsys,
    )
    assert code == 0, err
    summary = next(line for line in out.splitlines() if line.startswith("data: "))
    for kind in ("caption_not_utf8=", "corrupt_image=", "empty_caption=", "missing_file=", "truncated_sample=",
                 "caption_truncated=", "truncated_shard="):
        assert kind in summary, summary
    assert read_metrics(tmp_path / "run")[-1]["epoch"] >= 1  # every shard was read at least once


def test_mostly_bad_shards_stop_the_run(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "part-0.tar", [
        *[shard_sample(f"a{i}", i) for i in range(2)],
        *[{"__key__": f"bad{i}", "png": os.urandom(100), "txt": b"x"} for i in range(10)],
    ])
    code, out, err = train_cli(
        tmp_path,
        ["data.dataset=shards", f"data.path={shards}/part-0.tar", "data.min_samples=5",
         "data.max_failure_ratio=0.5", "stages=[{levels: 2, steps: 3}]"],
        capsys,
    )
    assert code == 1
    assert "too many bad data samples" in err and "corrupt_image=" in err and "Traceback" not in err
