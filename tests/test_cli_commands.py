"""The command line as a new user meets it: every listed command has help and runs at tiny size, nothing
is overwritten unasked, errors name the flag and exit 2 without a traceback, --quiet is quiet."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from matryoshka import cli
from matryoshka.training.testing import tiny_config_dict
from matryoshka.typed_config import dump_yaml

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def listed_commands(capsys) -> list[str]:
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    block = text.split("COMMAND", 2)[-1]
    names = re.findall(r"^\s{4}([a-z][a-z-]+)\s", block, flags=re.M)
    assert names, text
    return names


def test_every_listed_command_has_help(capsys):
    names = listed_commands(capsys)
    assert set(names) == set(cli.COMMANDS)
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0
        assert f"matryoshka {name}" in capsys.readouterr().out


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert re.match(r"matryoshka \d+\.\d+\.\d+ \(torch ", capsys.readouterr().out)


def write_tiny_config(tmp_path: Path, *overrides: str) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(dump_yaml(tiny_config_dict(list(overrides))))
    return path


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_train_refuses_a_run_directory_without_resume_and_overwrite_moves_it_aside(tmp_path, capsys):
    config = write_tiny_config(tmp_path)
    run = tmp_path / "run"
    assert cli.main(["train", str(config), "--out", str(run), "--quiet"]) == 0
    assert capsys.readouterr().out == ""  # --quiet: nothing but errors
    before = snapshot(run)
    assert cli.main(["train", str(config), "--out", str(run)]) == 2
    message = capsys.readouterr().err
    assert str(run) in message and "--resume" in message and "--overwrite" in message and "another --out" in message
    assert snapshot(run) == before  # nothing was written
    assert cli.main(["train", str(config), "--out", str(run), "--overwrite", "--quiet"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before  # moved, never deleted
    assert (run / "model" / "config.yaml").is_file()
    assert cli.main(["train", str(config), "--out", str(run), "--resume", "--overwrite"]) == 2


def test_the_printed_next_command_works_for_a_class_conditional_model(tmp_path, capsys):
    config = write_tiny_config(tmp_path, "logging.progress=false")
    run = tmp_path / "run"
    assert cli.main(["train", str(config), "--out", str(run)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("next: "))
    argv = line.removeprefix("next: matryoshka ").replace("--out sample.png", f"--out {tmp_path / 's.png'}")
    import shlex

    assert cli.main([*shlex.split(argv), "--steps", "2", "--quiet"]) == 0
    assert (tmp_path / "s.png").is_file()


@pytest.fixture(scope="module")
def class_model(tmp_path_factory) -> Path:
    from matryoshka.training import train
    from matryoshka.training.testing import tiny_config

    out = tmp_path_factory.mktemp("class-model")
    return train(tiny_config(["logging.progress=false", "logging.sample_count=0"]), out, quiet=True).model_dir


def test_generate_never_overwrites_unasked_and_writes_each_image_enlarged(class_model, tmp_path, capsys):
    out = tmp_path / "grid.png"
    base = ["generate", "--model", str(class_model), "--class", "3", "--steps", "2", "--seed", "0", "--quiet"]
    assert cli.main([*base, "--num-images", "4", "--save-each", "--all-levels", "--scale", "3", "--out", str(out)]) == 0
    assert capsys.readouterr().out == ""
    with Image.open(out) as grid:
        assert grid.size == (3 * (2 * 18 + 2), 3 * (2 * 18 + 2))
    for i in range(4):
        with Image.open(tmp_path / f"grid.{i}.png") as one:
            assert one.size == (48, 48)  # 16 px, three times
        assert (tmp_path / f"grid.{i}.level1.png").is_file()
    before = out.read_bytes()
    assert cli.main([*base, "--seed", "1", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    assert cli.main([*base, "--seed", "1", "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != before


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--steps", "5000"], "--steps 5000: must be between 1 and 1000"),
    (["--num-images", "0"], "--num-images must be >= 1"),
    (["--scale", "0"], "--scale must be a whole number >= 1"),
    (["--device", "cuda:0"], "--device cuda:0"),
    (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
])
def test_generate_errors_name_the_flag_and_exit_2(class_model, tmp_path, capsys, argv, message):
    if "cuda" in argv[-1] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    code = cli.main(["generate", "--model", str(class_model), "--class", "1", *argv, "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda is valid here")
@pytest.mark.parametrize("command", ["train", "eval", "quickstart", "demo"])
def test_a_device_this_torch_cannot_use_is_refused_before_any_work(class_model, tmp_path, capsys, command):
    extra = {"train": [str(write_tiny_config(tmp_path)), "--out", str(tmp_path / "r")],
             "eval": ["--model", str(class_model), "--out", str(tmp_path / "e")],
             "quickstart": ["--out", str(tmp_path / "q")], "demo": ["--model", str(class_model)]}[command]
    assert cli.main([command, *extra, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "use --device cpu" in err
    assert not any(tmp_path.glob("[req]"))


def test_a_missing_optional_dependency_names_the_extra(class_model, tmp_path, capsys, monkeypatch):
    import matryoshka.pipeline as pipeline

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'transformers'", name="transformers")

    monkeypatch.setattr(pipeline.MatryoshkaPipeline, "from_pretrained", missing)
    assert cli.main(["generate", "a cat", "--model", str(class_model), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert 'pip install "matryoshka-diffusion[text]"' in err and "Traceback" not in err


def test_eval_and_convert_refuse_to_overwrite(class_model, tmp_path, capsys):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "report.json").write_text("{}")
    assert cli.main(["eval", "--model", str(class_model), "--out", str(tmp_path / "e")]) == 2
    assert "--out" in capsys.readouterr().err and (tmp_path / "e" / "report.json").read_text() == "{}"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    assert cli.main(["convert-mlmdm", "missing.pth", "--out", str(tmp_path / "c")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "c" / "keep.txt").read_text() == "mine"


def test_quickstart_trains_samples_and_says_what_it_wrote(tmp_path, capsys):
    out = tmp_path / "qs"
    assert cli.main(["quickstart", "--out", str(out), "--max-steps", "2"]) == 0
    text = capsys.readouterr().out
    assert str(out / "model") in text and str(out / "samples.png") in text and "matryoshka generate" in text
    with Image.open(out / "samples.png") as grid:
        assert grid.height > 10 * 16  # ten labelled rows
    assert cli.main(["quickstart", "--out", str(out), "--max-steps", "2"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_a_model_directory_recommends_its_sampling_settings(class_model, tmp_path):
    from matryoshka.model_dir import load_model_dir, save_model_dir
    from matryoshka.pipeline import MatryoshkaPipeline

    model, config = load_model_dir(class_model)
    config.sampling.num_inference_steps, config.sampling.guidance_scale = 3, 1.0
    pipe = MatryoshkaPipeline.from_pretrained(save_model_dir(tmp_path / "m", model, config))
    out = pipe(class_labels=[1, 2], generator=0, progress=False)
    assert out.evaluations["network_rows"] == 3 * 2  # 3 steps, unguided: one row per sample
    told = pipe(class_labels=[1, 2], generator=0, progress=False, num_inference_steps=2, guidance_scale=4.0)
    assert told.evaluations["network_rows"] == 2 * 2 * 2
    embedded = MatryoshkaPipeline.from_pretrained(Path(cli.__file__).parent / "assets" / "fashion-t2i")
    assert embedded.config.sampling.guidance_scale == 3.0  # its card's recommendation


def test_quiet_silences_the_libraries_too(tmp_path, capsys):
    from matryoshka.conditioning.testing import make_tiny_t5
    from matryoshka.diffusion import DiffusionConfig
    from matryoshka.model_dir import MDMConfig, save_model_dir
    from matryoshka.models import LevelConfig, ModelConfig, NestedUNet

    t5 = make_tiny_t5(tmp_path / "t5")
    levels = [LevelConfig(channels=[8, 8], num_res_blocks=[1, 1], norm_groups=4, temb_dim=32),
              LevelConfig(channels=[8, 16], num_res_blocks=[1, 1], attention_layers=[0, 1], num_heads=2,
                          norm_groups=4, temb_dim=32)]
    config = MDMConfig(model=ModelConfig(levels=levels, image_size=16, in_channels=1, text_dim=32),
                       diffusion=DiffusionConfig(), text_encoder=f"t5:{t5}")
    directory = save_model_dir(tmp_path / "model", NestedUNet(config.model), config)
    capsys.readouterr()
    assert cli.main(["generate", "a red cat", "--model", str(directory), "--steps", "2", "--quiet",
                     "--out", str(tmp_path / "x.png")]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
