"""What a run reports while it trains: TensorBoard scalars, metrics.jsonl, a tqdm bar (rank 0 only).

metrics.jsonl holds one JSON object per logged step (the same scalars TensorBoard gets), so a run's
curves can be read without TensorBoard, e.g. by tests and benchmarks.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class RunMonitor:
    def __init__(
        self, out_dir: Path, enabled: bool, tensorboard: bool, progress: bool, total_steps: int, start_step: int,
        quiet: bool = False,
    ) -> None:
        self.enabled = enabled
        self.quiet = quiet  # no messages (errors still raise)
        self.writer = None
        self.bar = None
        self.metrics_path = out_dir / "metrics.jsonl"
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional dependency (the "train" extra)
                warnings.warn("tensorboard is not installed: scalars go to metrics.jsonl only", stacklevel=2)
            else:
                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
        self.bar = tqdm(
            total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
            disable=not progress,
        )

    def scalars(self, step: int, values: dict[str, float], extra: dict[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, **values, **(extra or {})}) + "\n")
        except OSError as error:
            from matryoshka.training.checkpoint import RunWriteError

            raise RunWriteError(
                error.errno, f"could not append step {step} to {self.metrics_path}: {error.strerror or error}; the "
                "checkpoints are intact: fix the cause (e.g. free some space), then continue with --resume",
            ) from error

    def image(self, tag: str, image, step: int) -> None:
        """A PIL image to TensorBoard (the preview grids)."""
        if not self.enabled or self.writer is None:
            return
        import numpy as np

        self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def advance(self, step: int, postfix: dict[str, str] | None = None) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.bar.n)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def message(self, text: str) -> None:
        if not self.enabled or self.quiet:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in order."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


__all__ = ["RunMonitor", "read_metrics"]
