"""Counting bad samples instead of crashing on them.

Every loader in this package turns a broken input (undecodable image, truncated file, bad caption,
truncated tar, missing file) into a counted fault and moves on. A `FaultCounter` keeps those counts
and stops the run with a `DataFaultError` once too large a share of the data is bad, because a
silently shrinking dataset is worse than a crash.

Counts live in a small shared-memory tensor with one row per process (the main process and each
DataLoader worker), so that counts made inside worker processes are visible to the process that
owns the DataLoader, and no cross-process lock is needed: each row has exactly one writer.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch.utils.data import get_worker_info

# A failure means the sample was dropped; it counts towards the failure ratio.
FAILURE_KINDS: tuple[str, ...] = (
    "missing_file",  # listed (or named by a shard list) but gone when read
    "unreadable_file",  # present but could not be read (permissions, I/O error, network)
    "truncated_image",  # image bytes end early
    "corrupt_image",  # image bytes that no decoder understands
    "oversize_file",  # larger than the configured limit; never read into memory
    "caption_not_utf8",  # caption bytes that are not valid UTF-8
    "empty_caption",  # empty caption where one is required
    "missing_caption",  # no caption member/file where one is required
    "missing_image",  # a shard sample with no image member
    "truncated_sample",  # a shard sample cut off by a truncated tar
    "unreadable_shard",  # a whole shard that could not be opened
)
# A note means the sample was kept, possibly altered; notes do not count towards the ratio.
NOTE_KINDS: tuple[str, ...] = (
    "caption_truncated",  # overlong caption cut to the configured maximum length
    "empty_caption_kept",  # empty caption kept because captions are optional there
    "truncated_shard",  # a tar that ends early (its cut sample is counted as truncated_sample)
    "bad_metadata",  # sidecar JSON that does not parse (metadata is not used for training)
)
_COLUMNS: tuple[str, ...] = ("ok", *FAILURE_KINDS, *NOTE_KINDS)
_COLUMN = {name: i for i, name in enumerate(_COLUMNS)}
# Row 0: the main process; rows 1..: DataLoader workers (worker id modulo the count).
_WORKER_ROWS = 64


class DataFaultError(RuntimeError):
    """Too large a share of the data failed to load (see `FaultCounter.check`)."""


class SampleFault(Exception):
    """Raised by decoders for one bad sample; loaders catch it and count `kind`."""

    def __init__(self, kind: str, detail: str = "") -> None:
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known kinds: {', '.join(FAILURE_KINDS)}")
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


class FaultCounter:
    """Counts good samples, failures and notes by kind, across DataLoader worker processes.

    Args:
        max_failure_ratio: largest tolerated share of failed samples (failures / (ok + failures)).
        min_samples: `check` raises only once at least this many samples were attempted, so that a
            few bad files at the start of a run do not stop it.
        auto_check: call `check()` after every recorded failure (loaders rely on this to stop early).
    """

    def __init__(self, max_failure_ratio: float = 0.1, min_samples: int = 100, auto_check: bool = True):
        if not 0.0 <= max_failure_ratio <= 1.0:
            raise ValueError(f"max_failure_ratio must be in [0, 1], got {max_failure_ratio}")
        if min_samples < 0:
            raise ValueError(f"min_samples must be >= 0, got {min_samples}")
        self.max_failure_ratio = float(max_failure_ratio)
        self.min_samples = int(min_samples)
        self.auto_check = auto_check
        self._counts = torch.zeros(1 + _WORKER_ROWS, len(_COLUMNS), dtype=torch.int64).share_memory_()
        self._lock = threading.Lock()

    # Pickling (DataLoader workers): the shared tensor travels as shared memory, the lock is per process.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @staticmethod
    def _row() -> int:
        info = get_worker_info()
        return 0 if info is None else 1 + info.id % _WORKER_ROWS

    def _add(self, column: str, n: int) -> None:
        with self._lock:
            self._counts[self._row(), _COLUMN[column]] += n

    def record_ok(self, n: int = 1) -> None:
        """Count `n` samples delivered successfully."""
        self._add("ok", n)

    def record_failure(self, kind: str) -> None:
        """Count one dropped sample of `kind` (one of FAILURE_KINDS); may raise DataFaultError."""
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}; known kinds: {', '.join(FAILURE_KINDS)}")
        self._add(kind, 1)
        if self.auto_check:
            self.check()

    def record_note(self, kind: str) -> None:
        """Count one kept-but-altered sample or a non-sample event of `kind` (one of NOTE_KINDS)."""
        if kind not in NOTE_KINDS:
            raise ValueError(f"unknown note kind {kind!r}; known kinds: {', '.join(NOTE_KINDS)}")
        self._add(kind, 1)

    def counts(self) -> dict[str, int]:
        """All counts summed over processes, including zeros, keyed by 'ok' and every kind."""
        totals = self._counts.sum(dim=0).tolist()
        return dict(zip(_COLUMNS, totals, strict=True))

    @property
    def ok(self) -> int:
        return self.counts()["ok"]

    @property
    def failed(self) -> int:
        counts = self.counts()
        return sum(counts[k] for k in FAILURE_KINDS)

    def ratio(self) -> float:
        """failures / (ok + failures); 0.0 before any sample was attempted."""
        counts = self.counts()
        failed = sum(counts[k] for k in FAILURE_KINDS)
        attempted = failed + counts["ok"]
        return failed / attempted if attempted else 0.0

    def report(self) -> dict[str, Any]:
        """A JSON-friendly summary: totals, the ratio, and the non-zero counts by kind."""
        counts = self.counts()
        failed = sum(counts[k] for k in FAILURE_KINDS)
        attempted = failed + counts["ok"]
        return {
            "attempted": attempted,
            "ok": counts["ok"],
            "failed": failed,
            "failure_ratio": failed / attempted if attempted else 0.0,
            "failures": {k: counts[k] for k in FAILURE_KINDS if counts[k]},
            "notes": {k: counts[k] for k in NOTE_KINDS if counts[k]},
        }

    def check(self, max_failure_ratio: float | None = None, min_samples: int | None = None) -> None:
        """Raise DataFaultError if the failure ratio exceeds the maximum after `min_samples` attempts.

        Arguments left as None use the values given at construction.
        """
        limit = self.max_failure_ratio if max_failure_ratio is None else max_failure_ratio
        minimum = self.min_samples if min_samples is None else min_samples
        report = self.report()
        if report["attempted"] < minimum or report["failure_ratio"] <= limit:
            return
        by_kind = ", ".join(f"{k}={n}" for k, n in sorted(report["failures"].items(), key=lambda kv: -kv[1]))
        raise DataFaultError(
            f"too many bad data samples: {report['failed']} of {report['attempted']} failed "
            f"(failure ratio {report['failure_ratio']:.3f} > max_failure_ratio {limit:.3f}); "
            f"by kind: {by_kind}. Fix or remove the bad files, or raise max_failure_ratio."
        )

    def reset(self) -> None:
        """Zero every count (in all processes sharing this counter)."""
        with self._lock:
            self._counts.zero_()

    def __repr__(self) -> str:
        r = self.report()
        return f"FaultCounter(ok={r['ok']}, failed={r['failed']}, ratio={r['failure_ratio']:.3f})"
