"""The official-checkpoint loader never executes pickled code."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from matryoshka.interop import UnsafeCheckpointError, load_official, safe_load
from matryoshka.interop.safe_pickle import PickledObject


class _Config:  # stands in for an ml_mdm config class; pickled under a module that does not exist here
    def __init__(self):
        self.channels = [8, 16]


_Config.__module__ = "legacy_mdm_unet"
_Config.__qualname__ = "UNetConfig"


def _write_checkpoint(path: Path, payload) -> None:
    torch.save(payload, path)


def _torch_zip_with_pickle(path: Path, pickled: bytes) -> None:
    """A torch-format zip archive whose data.pkl is the given bytes."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/matryoshka_pwned",))


class _Evals:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def test_reads_tensors_and_foreign_config_objects(tmp_path):
    import sys
    import types

    module = types.ModuleType("legacy_mdm_unet")
    module.UNetConfig = _Config
    sys.modules["legacy_mdm_unet"] = module
    try:
        weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "h": torch.ones(2, dtype=torch.float16)}
        view = torch.arange(10.0)[2:8:2]
        _write_checkpoint(tmp_path / "ck.pth", {"state_dict": weights, "args": _Config(), "view": view, "n": 3})
    finally:
        del sys.modules["legacy_mdm_unet"]
    loaded = safe_load(tmp_path / "ck.pth")
    assert torch.equal(loaded["state_dict"]["w"], weights["w"])
    assert loaded["state_dict"]["h"].dtype == torch.float16
    assert torch.equal(loaded["view"], torch.tensor([2.0, 4.0, 6.0]))
    assert isinstance(loaded["args"], PickledObject)
    assert loaded["args"].qualname == "legacy_mdm_unet.UNetConfig"
    assert loaded["args"].fields() == {"channels": [8, 16]}


@pytest.mark.parametrize("payload", [_RunsCode(), _Evals()], ids=["os.system", "eval"])
def test_refuses_pickles_that_run_code(tmp_path, payload):
    marker = Path("/tmp/matryoshka_pwned")
    marker.unlink(missing_ok=True)
    _torch_zip_with_pickle(tmp_path / "evil.pth", pickle.dumps({"state_dict": {}, "x": payload}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="refusing to load global"):
        safe_load(tmp_path / "evil.pth")
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        load_official(tmp_path / "evil.pth")


def test_refuses_torch_internals_and_lowercase_callables(tmp_path):
    for module, name in [("torch", "load"), ("subprocess", "Popen"), ("somepkg.tools", "run_shell")]:
        pickled = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."
        _torch_zip_with_pickle(tmp_path / "x.pth", pickled)
        with pytest.raises(UnsafeCheckpointError, match=f"{module}.{name}"):
            safe_load(tmp_path / "x.pth")


def test_refuses_non_zip_and_truncated_storages(tmp_path):
    (tmp_path / "legacy.pth").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UnsafeCheckpointError, match="not a torch zip checkpoint"):
        safe_load(tmp_path / "legacy.pth")
    torch.save({"w": torch.zeros(1000)}, tmp_path / "ok.pth")
    with zipfile.ZipFile(tmp_path / "ok.pth") as src, zipfile.ZipFile(tmp_path / "cut.pth", "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            dst.writestr(item, data[:100] if item.endswith("data/0") else data)
    with pytest.raises(UnsafeCheckpointError, match="truncated"):
        safe_load(tmp_path / "cut.pth")
