"""`matryoshka convert-mlmdm` writes a model directory that reproduces the official forward pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from matryoshka.cli import main
from matryoshka.model_dir import load_model_dir

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "ml-mdm" / "nested_tiny"


def test_cli_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    assert "convert-mlmdm" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["convert-mlmdm", "--help"])
    assert exit_info.value.code == 0


@pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"{FIXTURE} is absent (the shared fixtures live beside the repo)")
def test_convert_then_load_reproduces_forward(tmp_path):
    out = tmp_path / "converted"
    assert main(["convert-mlmdm", str(FIXTURE / "vis_model.pth"), "--config", str(FIXTURE / "config.yaml"),
                 "--out", str(out)]) == 0
    model, config = load_model_dir(out)
    assert config.text_encoder.startswith("t5:")
    tensors = load_file(FIXTURE / "forward.safetensors")
    with torch.no_grad():
        outputs = model([tensors["x_0"], tensors["x_1"]], tensors["t"], tensors["lm_outputs"], tensors["lm_mask"])
    torch.testing.assert_close(outputs[0], tensors["out_0"], atol=1e-4, rtol=0)
    # Without --config the config pickled in the checkpoint is used (read as inert data).
    assert main(["convert-mlmdm", str(FIXTURE / "vis_model.pth"), "--out", str(tmp_path / "from_args")]) == 0
    _, from_args = load_model_dir(tmp_path / "from_args")
    assert from_args.model == config.model and from_args.diffusion == config.diffusion
