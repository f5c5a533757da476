"""Bad data is skipped and counted, never a crash: FaultCounter, image folders and tar shards."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from matryoshka.data import (
    DataFaultError,
    FaultCounter,
    ImageFolderDataset,
    ShardDataset,
    decode_caption,
    expand_braces,
    expand_shard_list,
    write_shard,
)

# ---------------------------------------------------------------- helpers


def _image_bytes(fmt: str, value: int, size: tuple[int, int] = (24, 16)) -> bytes:
    # Noise makes JPEGs long enough that a truncated one is really missing scan data.
    rng = np.random.default_rng(value)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _truncated_jpeg() -> bytes:
    data = _image_bytes("JPEG", 1, (64, 64))
    return data[: len(data) // 2]


# ---------------------------------------------------------------- FaultCounter


def test_fault_counter_ratio_report_and_threshold_message() -> None:
    faults = FaultCounter(max_failure_ratio=0.2, min_samples=10, auto_check=False)
    assert faults.ratio() == 0.0
    faults.record_ok(7)
    faults.record_failure("corrupt_image")
    faults.record_failure("corrupt_image")
    faults.record_failure("caption_not_utf8")
    faults.record_note("caption_truncated")
    report = faults.report()
    assert report == {
        "attempted": 10,
        "ok": 7,
        "failed": 3,
        "failure_ratio": pytest.approx(0.3),
        "failures": {"corrupt_image": 2, "caption_not_utf8": 1},
        "notes": {"caption_truncated": 1},
    }
    faults.check(max_failure_ratio=0.3)  # at the limit is fine
    faults.check(min_samples=11)  # not enough samples yet to judge
    with pytest.raises(DataFaultError) as info:
        faults.check()
    message = str(info.value)
    for part in ("3 of 10", "0.300", "0.200", "corrupt_image=2", "caption_not_utf8=1", "max_failure_ratio"):
        assert part in message, (part, message)
    faults.reset()
    assert faults.report()["attempted"] == 0


def test_fault_counter_auto_check_and_kind_validation() -> None:
    faults = FaultCounter(max_failure_ratio=0.5, min_samples=4)
    faults.record_ok(2)
    faults.record_failure("missing_file")
    faults.record_failure("missing_file")  # 2 of 4 = 0.5: still allowed
    with pytest.raises(DataFaultError, match="3 of 5"):
        faults.record_failure("truncated_image")
    with pytest.raises(ValueError, match="unknown failure kind"):
        faults.record_failure("cosmic_ray")
    with pytest.raises(ValueError, match="unknown note kind"):
        faults.record_note("corrupt_image")
    with pytest.raises(ValueError, match="max_failure_ratio"):
        FaultCounter(max_failure_ratio=1.5)


class _EveryThirdFails(Dataset):
    def __init__(self, faults: FaultCounter) -> None:
        self.faults = faults

    def __len__(self) -> int:
        return 30

    def __getitem__(self, index: int) -> int:
        if index % 3 == 0:
            self.faults.record_failure("corrupt_image")
        else:
            self.faults.record_ok()
        return index


def test_fault_counter_sees_counts_made_in_dataloader_workers() -> None:
    faults = FaultCounter(max_failure_ratio=1.0)
    loader = DataLoader(_EveryThirdFails(faults), batch_size=5, num_workers=2)
    assert sum(len(batch) for batch in loader) == 30
    assert faults.report()["ok"] == 20 and faults.report()["failures"] == {"corrupt_image": 10}


# ---------------------------------------------------------------- image folders


def _faulty_folder(root: Path) -> dict[str, str]:
    """Write good and bad files; return {file name: expected caption} for the good ones."""
    good = {}
    for i in range(6):
        name = f"good{i}.png" if i % 2 else f"good{i}.jpg"
        (root / name).write_bytes(_image_bytes("PNG" if i % 2 else "JPEG", i))
        good[name] = f"good number {i}"
        (root / f"good{i}.txt").write_text(f"good number {i}", encoding="utf-8")
    (root / "good0.txt").write_bytes("\ufeffgood number 0\n".encode())  # a BOM and a newline are fine
    (root / "nocaption.png").write_bytes(_image_bytes("PNG", 10))
    good["nocaption.png"] = ""
    (root / "long.png").write_bytes(_image_bytes("PNG", 11))
    (root / "long.txt").write_text("x" * 100)
    good["long.png"] = "x" * 40
    (root / "emptycaption.png").write_bytes(_image_bytes("PNG", 12))
    (root / "emptycaption.txt").write_text("   \n")
    good["emptycaption.png"] = ""
    (root / "truncated.jpg").write_bytes(_truncated_jpeg())
    (root / "noise.png").write_bytes(os.urandom(300))
    (root / "latin1.png").write_bytes(_image_bytes("PNG", 13))
    (root / "latin1.txt").write_bytes("une robe d'été".encode("latin-1"))
    (root / "deleted.png").write_bytes(_image_bytes("PNG", 14))
    return good


EXPECTED_FOLDER_FAILURES = {
    "truncated_image": 1,
    "corrupt_image": 1,
    "caption_not_utf8": 1,
    "missing_file": 1,
}


def test_image_folder_skips_and_counts_bad_files(tmp_path: Path) -> None:
    good = _faulty_folder(tmp_path)
    faults = FaultCounter(max_failure_ratio=0.5, min_samples=1000)
    dataset = ImageFolderDataset(tmp_path, image_size=8, faults=faults, max_caption_chars=40)
    (tmp_path / "deleted.png").unlink()  # gone between the scan and the read
    assert len(dataset) == len(good) + 4
    captions_by_name: dict[str, str] = {}
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["image"].shape == (3, 8, 8) and item["label"] == -1
        name = dataset.paths[index].name
        if name in good:  # a good item is returned as itself
            captions_by_name[name] = item["caption"]
        else:  # a bad one is replaced by some good item
            assert item["caption"] in good.values()
    assert captions_by_name == good
    report = faults.report()
    assert report["failures"] == EXPECTED_FOLDER_FAILURES
    assert report["ok"] == len(good) and report["attempted"] == len(dataset)
    assert report["notes"] == {"caption_truncated": 1, "empty_caption_kept": 1}
    # A second epoch counts the same files again, without re-decoding the known-bad ones.
    for index in range(len(dataset)):
        dataset[index]
    assert faults.report()["failures"] == {k: 2 * v for k, v in EXPECTED_FOLDER_FAILURES.items()}


def test_image_folder_in_a_dataloader_with_workers_never_crashes(tmp_path: Path) -> None:
    good = _faulty_folder(tmp_path)
    faults = FaultCounter(max_failure_ratio=0.5, min_samples=1000)
    dataset = ImageFolderDataset(tmp_path, image_size=8, faults=faults, max_caption_chars=40)
    (tmp_path / "deleted.png").unlink()
    batches = list(DataLoader(dataset, batch_size=4, num_workers=2))
    images = torch.cat([b["image"] for b in batches])
    assert images.shape == (len(dataset), 3, 8, 8) and images.abs().max() <= 1
    assert all(caption in good.values() for b in batches for caption in b["caption"])
    assert faults.report()["failures"] == EXPECTED_FOLDER_FAILURES  # counted inside the workers


def test_image_folder_of_only_bad_files_raises_a_clear_error(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"not a jpeg at all")
    dataset = ImageFolderDataset(tmp_path, image_size=8, faults=FaultCounter(min_samples=1000))
    with pytest.raises(DataFaultError, match="none of the 3 images"):
        dataset[0]
    (tmp_path / "bad2.jpg").write_bytes(_image_bytes("JPEG", 0))  # now bad0, bad1, then a good one
    strict = ImageFolderDataset(tmp_path, image_size=8, faults=FaultCounter(max_failure_ratio=0.1, min_samples=2))
    assert strict[0]["image"].shape == (3, 8, 8)  # 1 of 1 failed: below min_samples, the good one stands in
    with pytest.raises(DataFaultError, match="2 of 2 failed"):  # ... but not once the limit is passed
        strict[1]


def test_decode_caption_normalises_and_truncates() -> None:
    assert decode_caption(b"  a\tb\r\n c\x00 ") == ("a b c", False)
    assert decode_caption("y" * 10, max_chars=4) == ("yyyy", True)
    with pytest.raises(Exception, match="caption_not_utf8"):
        decode_caption(b"\xff\xfe\xfa")


# ---------------------------------------------------------------- tar shards


def _sample(key: str, caption: bytes | None, image: bytes | None = None, seed: int = 0) -> dict[str, bytes]:
    sample = {"__key__": key, "jpg": image if image is not None else _image_bytes("JPEG", seed, (20, 12))}
    if caption is not None:
        sample["txt"] = caption
    sample["json"] = json.dumps({"key": key, "status": "success"}).encode()
    return sample


def _member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


def _write_shards(root: Path) -> tuple[list[str], set[str]]:
    """Six shards (one truncated inside a member, one at a member boundary) and one missing shard path.

    Returns the shard paths and the captions of the good samples (captions are unique ids).
    """
    good: set[str] = set()
    paths = []
    for s in range(6):
        samples = []
        for i in range(5):
            caption = f"shard {s} sample {i}"
            samples.append(_sample(f"{s:05d}{i:04d}", caption.encode(), seed=10 * s + i))
            good.add(caption)
        paths.append(root / f"{s:05d}.tar")
        if s == 1:  # bad images
            samples[1] = _sample("000010001", b"shard 1 sample 1", image=os.urandom(200))
            samples[2] = _sample("000010002", b"shard 1 sample 2", image=_truncated_jpeg())
            good -= {"shard 1 sample 1", "shard 1 sample 2"}
        if s == 2:  # bad captions: not UTF-8, missing, empty, overlong (kept, truncated)
            samples[0] = _sample("000020000", "légende".encode("latin-1"))
            samples[1] = _sample("000020001", None)
            samples[2] = _sample("000020002", b"  ")
            samples[3] = _sample("000020003", b"shard 2 sample 3 " + b"z" * 200)
            good -= {"shard 2 sample 0", "shard 2 sample 1", "shard 2 sample 2", "shard 2 sample 3"}
            good.add("shard 2 sample 3 " + "z" * (64 - len("shard 2 sample 3 ")))
        write_shard(paths[-1], samples)
    # Shard 3 ends inside the image of sample 3: samples 3 and 4 are lost (sample 3 is counted).
    offsets = _member_offsets(paths[3])
    data = paths[3].read_bytes()
    paths[3].write_bytes(data[: offsets["000030003.jpg"][1] + 50])
    good -= {"shard 3 sample 3", "shard 3 sample 4"}
    # Shard 4 ends at the header of sample 3's json: sample 3 is whole (json is unused), sample 4 is lost.
    offsets = _member_offsets(paths[4])
    data = paths[4].read_bytes()
    paths[4].write_bytes(data[: offsets["000040003.json"][0]])
    good -= {"shard 4 sample 4"}
    return [str(p) for p in paths] + [str(root / "missing.tar")], good


EXPECTED_SHARD_FAILURES = {
    "corrupt_image": 1,
    "truncated_image": 1,
    "caption_not_utf8": 1,
    "missing_caption": 1,
    "empty_caption": 1,
    "truncated_sample": 1,
    "missing_file": 1,
}
EXPECTED_SHARD_NOTES = {"truncated_shard": 2, "caption_truncated": 1}


def _read_all(datasets: list[ShardDataset], num_workers: int) -> list[str]:
    captions = []
    for dataset in datasets:
        loader = DataLoader(dataset, batch_size=3, num_workers=num_workers)
        for batch in loader:
            assert batch["image"].shape[1:] == (3, 8, 8)
            assert torch.all(batch["label"] == -1)
            captions.extend(batch["caption"])
    return captions


def _merged(counters: list[FaultCounter]) -> tuple[Counter, Counter, int]:
    failures, notes, ok = Counter(), Counter(), 0
    for faults in counters:
        report = faults.report()
        failures.update(report["failures"])
        notes.update(report["notes"])
        ok += report["ok"]
    return failures, notes, ok


def test_shards_every_good_sample_exactly_once_across_ranks_and_workers(tmp_path: Path) -> None:
    shards, good = _write_shards(tmp_path)
    counters = [FaultCounter(max_failure_ratio=0.5, min_samples=1000) for _ in range(2)]
    datasets = [
        ShardDataset(shards, image_size=8, shuffle_buffer=4, seed=3, rank=rank, world_size=2,
                     max_caption_chars=64, faults=counters[rank])
        for rank in range(2)
    ]
    captions = _read_all(datasets, num_workers=2)
    assert Counter(captions) == Counter(good)  # each good sample once, nothing else
    failures, notes, ok = _merged(counters)
    assert dict(failures) == EXPECTED_SHARD_FAILURES
    assert dict(notes) == EXPECTED_SHARD_NOTES
    assert ok == len(good)

    # The next epoch: another order, the same samples (workers are re-created and see the new epoch).
    for dataset in datasets:
        dataset.set_epoch(1)
    again = _read_all(datasets, num_workers=2)
    assert Counter(again) == Counter(good) and again != captions


def test_shards_are_split_between_workers_of_one_rank_without_overlap(tmp_path: Path) -> None:
    shards, good = _write_shards(tmp_path)
    dataset = ShardDataset(shards, image_size=8, shuffle=False, max_caption_chars=64,
                           faults=FaultCounter(max_failure_ratio=0.5, min_samples=1000))
    in_process = _read_all([dataset], num_workers=0)
    # Without shuffling, samples come in shard-list and tar order.
    assert in_process == sorted(good, key=lambda c: (int(c.split()[1]), int(c.split()[3])))
    per_worker = [dataset.shards_for(0, worker, 3) for worker in range(3)]
    assert sorted(s for w in per_worker for s in w) == sorted(shards)


def test_shard_dataset_repeat_runs_past_one_epoch(tmp_path: Path) -> None:
    path = tmp_path / "one.tar"
    write_shard(path, [_sample(f"{i:09d}", f"c{i}".encode(), seed=i) for i in range(3)])
    dataset = ShardDataset(str(path), image_size=8, repeat=True, shuffle_buffer=2)
    stream = iter(dataset)
    captions = [next(stream)["caption"] for _ in range(7)]
    assert Counter(captions[:3]) == Counter(["c0", "c1", "c2"]) == Counter(captions[3:6])


def test_shard_dataset_stops_when_most_samples_are_bad(tmp_path: Path) -> None:
    path = tmp_path / "bad.tar"
    write_shard(path, [_sample(f"{i:09d}", b"caption", image=b"junk") for i in range(12)])
    dataset = ShardDataset(str(path), image_size=8, faults=FaultCounter(max_failure_ratio=0.2, min_samples=10))
    with pytest.raises(DataFaultError, match=r"10 of 10 failed .*corrupt_image=10"):
        list(dataset)


def test_shard_dataset_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot feed 4 ranks"):
        ShardDataset(["a.tar", "b.tar"], image_size=8, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        ShardDataset(["a.tar", "b.tar"], image_size=8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="unbalanced"):
        expand_shard_list("data/{000..003.tar")


def test_expand_braces() -> None:
    assert expand_braces("data/{00000..00002}.tar") == ["data/00000.tar", "data/00001.tar", "data/00002.tar"]
    assert expand_braces("{a,b}/{8..10}") == ["a/8", "a/9", "a/10", "b/8", "b/9", "b/10"]
    assert expand_braces("{x,{y,z}1}") == ["x", "y1", "z1"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_shard_list(["a.tar", "s/{1..2}.tar", Path("p.tar")]) == ["a.tar", "s/1.tar", "s/2.tar", "p.tar"]


@settings(max_examples=50, deadline=None)
@given(
    n_shards=st.integers(1, 40),
    world_size=st.integers(1, 5),
    num_workers=st.integers(1, 4),
    epoch=st.integers(0, 3),
)
def test_shard_assignment_partitions_the_list(n_shards: int, world_size: int, num_workers: int, epoch: int) -> None:
    if n_shards < world_size:
        return
    shards = [f"s{i}.tar" for i in range(n_shards)]
    assigned = [
        shard
        for rank in range(world_size)
        for worker in range(num_workers)
        for shard in ShardDataset(shards, 8, rank=rank, world_size=world_size).shards_for(epoch, worker, num_workers)
    ]
    assert sorted(assigned) == sorted(shards)
