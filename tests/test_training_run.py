"""Whole (tiny) training runs in this process: stages, exports, logs, text conditioning, folders, shards, faults."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from matryoshka.data import DataFaultError, write_shard
from matryoshka.model_dir import load_model_dir
from matryoshka.training import read_metrics, train
from matryoshka.training.testing import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_two_stage_run_exports_logs_samples_and_generates(tmp_path: Path):
    out = tmp_path / "run"
    result = train(tiny_config(["logging.tensorboard=true", "checkpoint.every=3"]), out)
    assert result.step == 4 and result.stage == 1

    # Scalars: every step, the stage's levels only, finite.
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["stage"] for r in records] == [0, 0, 1, 1]
    assert "loss/8px" in records[0] and "loss/16px" not in records[0]
    assert {"loss", "loss/16px", "loss/8px", "lr", "grad_norm", "images_per_s"} <= set(records[-1])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    # Checkpoints at step 3 (every 3), the end of stage 1 (2) and of the run (4).
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["latest", "step-0000002", "step-0000003", "step-0000004"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000004"

    # One model directory per stage, DIR/model = the last; EMA weights with the stage's MDMConfig.
    first, config = load_model_dir(out / "stages" / "stage-1")
    assert config.model.sizes == [8]
    model, config = load_model_dir(out / "model")
    assert config.model.sizes == [16, 8] and config.model.num_classes == 10
    ema = result.ema_model.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, result.model.state_dict()[k]) for k, v in model.state_dict().items())

    # Sample grids: one row per sample, the stage's levels side by side (each shown at the stage's
    # top size, 2 px padding; stage 1 is 8 px alone, stage 2 is 8 and 16 px), enlarged twice, with a
    # margin on the left that names each row's class (white text on black).
    grids = sorted(p.name for p in (out / "samples").iterdir())
    assert grids == ["step-0000002.png", "step-0000004.png"]
    with Image.open(out / "samples" / "step-0000002.png") as grid:
        margin = grid.width - 2 * (10 + 2)
        assert grid.height == 2 * (2 * 10 + 2) and margin > 0
        assert np.asarray(grid.convert("L"))[:, :margin].max() > 128  # the labels are drawn
    with Image.open(out / "samples" / "step-0000004.png") as grid:
        assert grid.size == (margin + 2 * (2 * 18 + 2), 2 * (2 * 18 + 2))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [2, 4]

    # The exported directory is what `matryoshka generate --model` reads.
    from matryoshka.cli import main

    image = tmp_path / "sample.png"
    code = main(["generate", "--model", str(out / "model"), "--class", "7", "--steps", "2", "--seed", "0",
                 "--quiet", "--out", str(image)])
    assert code == 0
    with Image.open(image) as generated:
        assert generated.size == (16, 16)


def test_gradient_accumulation_equals_one_large_batch(tmp_path: Path):
    """2 micro-batches of 4 see the same samples, times and noise as one batch of 8: same update."""
    large = train(tiny_config(["stages=[{levels: 2, steps: 2, batch_size: 8}]"]), tmp_path / "large")
    accumulated = train(
        tiny_config(["optim.grad_accum=2", "stages=[{levels: 2, steps: 2, batch_size: 4}]"]), tmp_path / "accum"
    )
    for name, value in large.model.state_dict().items():
        assert torch.allclose(accumulated.model.state_dict()[name], value, atol=1e-6), name
    halved = train(tiny_config(["stages=[{levels: 2, steps: 2, batch_size: 4}]"]), tmp_path / "half")
    assert not torch.allclose(halved.model.conv_in.weight, large.model.conv_in.weight, atol=1e-6)


def test_bf16_channels_last_cosine_run(tmp_path: Path):
    config = tiny_config(
        ["optim.precision=bf16", "optim.channels_last=true", "optim.schedule=cosine", "optim.warmup_steps=0",
         "optim.implementation=for_loop", "optim.gradient_checkpointing=true", "stages=[{levels: 2, steps: 3}]"]
    )
    result = train(config, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert result.step == 3 and [r["lr"] for r in records] == pytest.approx([1e-3, 0.75e-3, 0.25e-3])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


def test_text_conditioned_run_with_an_embedding_cache(tmp_path: Path):
    from matryoshka.conditioning.testing import TINY_T5_DIM, make_tiny_t5

    t5 = make_tiny_t5(tmp_path / "t5")
    config = tiny_config(
        ["mdm.model.num_classes=0", f"mdm.model.text_dim={TINY_T5_DIM}", f"mdm.text_encoder=t5:{t5}",
         f"data.embedding_cache={tmp_path / 'cache'}", "stages=[{levels: 2, steps: 2}]"]
    )
    result = train(config, tmp_path / "run")
    assert result.step == 2
    cached = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(cached) >= 2  # the batch captions (and "" for dropped ones / previews)
    _, mdm = load_model_dir(tmp_path / "run" / "model")
    assert mdm.text_encoder == f"t5:{t5}" and mdm.model.text_dim == TINY_T5_DIM


def png_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (20, 20), color=value).save(buffer, format="PNG")
    return buffer.getvalue()


def image_folder(root: Path, good: int, bad: int) -> Path:
    for i in range(good):
        folder = root / ("shirts" if i % 2 else "bags")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(png_bytes(10 * i))
        (folder / f"{i}.txt").write_text(f"item {i}")
    for i in range(bad):
        (root / "bags" / f"broken{i}.png").write_bytes(b"\x89PNG not really")
    return root


def test_folder_dataset_counts_faults_in_the_logs(tmp_path: Path):
    root = image_folder(tmp_path / "images", good=14, bad=2)
    config = tiny_config(
        ["data.dataset=folder", f"data.path={root}", "data.labels=true", "data.limit=null", "data.min_samples=1",
         "data.max_failure_ratio=0.5", "mdm.model.num_classes=2", "stages=[{levels: 2, steps: 2}]"]
    )
    train(config, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert records[-1]["data/failed"] >= 1 and records[-1]["data/corrupt_image"] >= 1
    assert 0 < records[-1]["data/failure_ratio"] <= 0.5


def test_too_many_bad_samples_stop_the_run_with_the_fault_error(tmp_path: Path):
    root = image_folder(tmp_path / "images", good=8, bad=8)
    config = tiny_config(
        ["data.dataset=folder", f"data.path={root}", "data.limit=null", "data.min_samples=4",
         "data.max_failure_ratio=0.1", "stages=[{levels: 2, steps: 3}]"]
    )
    with pytest.raises(DataFaultError, match="max_failure_ratio"):
        train(config, tmp_path / "run")


def test_class_folders_must_match_num_classes(tmp_path: Path):
    root = image_folder(tmp_path / "images", good=8, bad=0)
    config = tiny_config(["data.dataset=folder", f"data.path={root}", "data.labels=true", "data.limit=null"])
    with pytest.raises(ValueError, match="num_classes"):
        train(config, tmp_path / "run")


def test_shard_dataset_run(tmp_path: Path):
    for shard in range(2):
        samples = [
            {"__key__": f"{shard}{i:03d}", "png": png_bytes(20 * i), "txt": f"sample {i}".encode()} for i in range(12)
        ]
        write_shard(tmp_path / f"shard-{shard}.tar", samples)
    config = tiny_config(
        ["data.dataset=shards", f"data.path={tmp_path}/shard-{{0..1}}.tar", "data.shuffle_buffer=4",
         "stages=[{levels: 2, steps: 4}]"]
    )
    result = train(config, tmp_path / "run")
    assert result.step == 4  # 24 samples = 3 batches of 8: the run went into a second epoch
    assert read_metrics(tmp_path / "run")[-1]["epoch"] == 1


def test_cli_reports_data_problems_without_a_traceback(tmp_path: Path, capsys):
    import yaml

    from matryoshka.cli import main
    from matryoshka.training.testing import tiny_config_dict

    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump(tiny_config_dict(["data.dataset=folder", f"data.path={tmp_path / 'nope'}"])))
    assert main(["train", str(missing), "--out", str(tmp_path / "a"), "--threads", "1"]) == 2
    assert "nope" in capsys.readouterr().err
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(tiny_config_dict(["data.limit=4"])))  # fewer items than one batch of 8
    assert main(["train", str(small), "--out", str(tmp_path / "b"), "--threads", "1"]) == 2
    assert "data.batch_size" in capsys.readouterr().err
