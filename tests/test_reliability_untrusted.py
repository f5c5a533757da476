"""Untrusted files never run code. Our model directories hold safetensors only; official pickles go
through the restricted unpickler only. Crafted malicious pickles (REDUCE, INST, OBJ, STACK_GLOBAL;
os.system, builtins.eval/exec, getattr chains, subprocess.Popen, look-alike modules, payloads nested
inside a genuine torch checkpoint's state dict) and malformed safetensors are refused with clear errors
by safe_load / load_official / MatryoshkaPipeline.from_official / `matryoshka convert-mlmdm` and by
load_model_dir / MatryoshkaPipeline.from_pretrained / `matryoshka generate`. Every payload would create
a marker file: it must never appear. (tests/test_safe_pickle.py has the loader's basic cases.)
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from matryoshka.cli import main
from matryoshka.interop import UnsafeCheckpointError, load_official, safe_load
from matryoshka.interop.safe_pickle import PickledObject
from matryoshka.model_dir import WEIGHTS_NAME, load_model_dir, save_model_dir
from matryoshka.models import NestedUNet
from matryoshka.pipeline import MatryoshkaPipeline
from matryoshka.training.testing import tiny_config
from matryoshka.typed_config import ConfigError


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """The file every payload tries to create."""
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a payload ran"


# ------------------------------------------------------------------------------------------------
# Pickles written opcode by opcode, so that each technique is exactly what it says.
def text(value: str) -> bytes:
    """BINUNICODE: push a str."""
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def call_global(module: str, name: str, *args: str) -> bytes:
    """GLOBAL module.name, MARK args TUPLE, REDUCE: module.name(*args)."""
    return f"c{module}\n{name}\n".encode() + b"(" + b"".join(text(a) for a in args) + b"tR"


def protocol2(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def stack_global_call(module: str, name: str, *args: str) -> bytes:
    """Protocol 4: SHORT_BINUNICODE module, name, STACK_GLOBAL, then the call."""
    short = b"".join(b"\x8c" + bytes([len(s)]) + s.encode() for s in (module, name))
    return b"\x80\x04" + short + b"\x93(" + b"".join(text(a) for a in args) + b"tR."


def payloads(marker: Path) -> dict[str, bytes]:
    touch = f"touch {marker}"
    write = f"open({str(marker)!r}, 'w').write('pwned')"
    in_dict = lambda body: protocol2(b"}" + text("state_dict") + b"}" + text("x") + body + b"ss")  # noqa: E731
    return {
        "os.system-via-REDUCE": protocol2(call_global("os", "system", touch)),
        "posix.system-via-REDUCE": protocol2(call_global("posix", "system", touch)),
        "builtins.eval": protocol2(call_global("builtins", "eval", write)),
        "builtins.exec": protocol2(call_global("builtins", "exec", write)),
        "__builtin__.eval (python 2 name)": protocol2(call_global("__builtin__", "eval", write)),
        "getattr-chain": protocol2(
            b"cbuiltins\ngetattr\n(" + call_global("builtins", "__import__", "os") + text("system") + b"tR("
            + text(touch) + b"tR"
        ),
        "subprocess.Popen": protocol2(b"csubprocess\nPopen\n((" + text("touch") + text(str(marker)) + b"ltR"),
        "os.system-via-INST (protocol 0)": f"(S'{touch}'\nios\nsystem\n.".encode(),
        "os.system-via-OBJ": b"(cos\nsystem\n" + text(touch) + b"o.",
        "os.system-via-STACK_GLOBAL (protocol 4)": stack_global_call("os", "system", touch),
        "torch.serialization.load (look-alike)": protocol2(call_global("torch.serialization", "load", str(marker))),
        "nt.system (look-alike)": protocol2(call_global("nt", "system", touch)),
        "operator.methodcaller": protocol2(call_global("operator", "methodcaller", "system", touch)),
        "importlib.import_module": protocol2(call_global("importlib", "import_module", "os")),
        "runpy.run_path": protocol2(call_global("runpy", "run_path", str(marker))),
        "copyreg._reconstructor": protocol2(call_global("copyreg", "_reconstructor")),
        "numpy.load": protocol2(call_global("numpy", "load", str(marker))),
        "nested-in-the-state-dict": in_dict(b"}" + text("inner") + b"]" + call_global("os", "system", touch) + b"as"),
    }


def torch_zip(path: Path, pickled: bytes) -> Path:
    """A torch-format zip archive (what torch.save writes) whose data.pkl is the given bytes."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    return path


PAYLOAD_NAMES = list(payloads(Path("/x")))


# Payloads that run their command under the standard unpickler (the others name something that does
# not exist here, or does harm only when used later); checked so that the refusals below mean something.
RUNNING = ["os.system-via-REDUCE", "posix.system-via-REDUCE", "builtins.eval", "builtins.exec",
           "__builtin__.eval (python 2 name)", "getattr-chain", "subprocess.Popen", "os.system-via-INST (protocol 0)",
           "os.system-via-OBJ", "os.system-via-STACK_GLOBAL (protocol 4)", "nested-in-the-state-dict"]
UNPICKLE_EACH = """
import json, os, pickle, sys, time
marker, pickles = json.loads(sys.stdin.read())
for name, data in pickles.items():
    pickle.loads(bytes.fromhex(data))
    for _ in range(100):  # Popen returns before its child has touched the file
        if os.path.exists(marker):
            break
        time.sleep(0.02)
    print(name, os.path.exists(marker))
    if os.path.exists(marker):
        os.unlink(marker)
"""


def test_the_payloads_are_real(tmp_path: Path):
    """The standard unpickler, in a separate process, runs every payload of RUNNING."""
    marker = tmp_path / "pwned"
    chosen = {name: data.hex() for name, data in payloads(marker).items() if name in RUNNING}
    result = subprocess.run([sys.executable, "-c", UNPICKLE_EACH], input=json.dumps([str(marker), chosen]),
                            capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.splitlines() == [f"{name} True" for name in chosen]


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_malicious_pickles_are_refused_by_every_official_loader(tmp_path: Path, marker: Path, name: str):
    checkpoint = torch_zip(tmp_path / "vis_model.pth", payloads(marker)[name])
    with pytest.raises(UnsafeCheckpointError, match="refusing to load global") as info:
        safe_load(checkpoint)
    assert "only plain data" in str(info.value)
    with pytest.raises(UnsafeCheckpointError):
        load_official(checkpoint)
    with pytest.raises(UnsafeCheckpointError):
        MatryoshkaPipeline.from_official(checkpoint)


def test_a_genuine_checkpoint_with_a_payload_deep_inside_is_refused(tmp_path: Path, marker: Path):
    """torch.save of real tensors, with an object whose __reduce__ runs a command nested in a dict in a
    list in the state dict: the tensors do not make it acceptable."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    checkpoint = tmp_path / "vis_model.pth"
    torch.save({"state_dict": {"conv_in.weight": torch.zeros(4, 1, 3, 3), "extra": [{"hook": Payload()}]},
                "args": {}}, checkpoint)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load global (posix|os)\.system"):
        load_official(checkpoint)


def test_the_command_line_refuses_it_in_one_line(tmp_path: Path, marker: Path, capsys):
    checkpoint = torch_zip(tmp_path / "vis_model.pth", payloads(marker)["builtins.exec"])
    code = main(["convert-mlmdm", str(checkpoint), "--out", str(tmp_path / "converted")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"matryoshka convert-mlmdm: refused {checkpoint}: refusing to load global builtins.exec")
    assert not (tmp_path / "converted").exists()


def test_an_importable_lookalike_class_is_recorded_never_imported(tmp_path: Path, marker: Path, monkeypatch):
    """A class from a non-library module becomes an inert record: its module is not even imported
    (importing it would run its top level, which here creates the marker)."""
    package = tmp_path / "site" / "ml_mdm_lookalike"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\nclass Payload:\n    def __init__(self, *a):\n"
        f"        open({str(marker)!r}, 'w').write('called')\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    # {"args": Payload("touch") with BUILD state {"opt": 1}}: REDUCE then BUILD, as a pickled config object.
    body = (b"}" + text("args") + call_global("ml_mdm_lookalike", "Payload", "touch")
            + b"}" + text("opt") + b"K\x01" + b"s" + b"b" + b"s")
    loaded = safe_load(torch_zip(tmp_path / "ck.pth", protocol2(body)))
    assert "ml_mdm_lookalike" not in sys.modules
    record = loaded["args"]
    assert isinstance(record, PickledObject) and record.qualname == "ml_mdm_lookalike.Payload"
    assert record.args == ("touch",) and record.fields() == {"opt": 1}


def test_numpy_object_scalars_are_refused(tmp_path: Path, marker: Path):
    """numpy's scalar() is allowed for plain numbers only: an object dtype would unpickle its bytes."""
    body = b"cnumpy.core.multiarray\nscalar\n(" + text("O") + b"C\x08" + b"\x00" * 8 + b"tR"
    with pytest.raises(UnsafeCheckpointError, match="malformed"):
        safe_load(torch_zip(tmp_path / "ck.pth", b"\x80\x03" + body + b"."))


@pytest.mark.parametrize(
    ("archive", "message"),
    [
        ({"archive/version": "3"}, "expected one data.pkl"),
        ({"a/data.pkl": protocol2(b"N"), "b/data.pkl": protocol2(b"N")}, "expected one data.pkl"),
        ({"archive/data.pkl": protocol2(b"N"), "archive/byteorder": "big"}, "big-endian"),
        ({"archive/data.pkl": protocol2(text("evil") + b"Q")}, "unexpected persistent id"),
        ({"archive/data.pkl": b"\x80\x02}" + text("x")}, "malformed checkpoint pickle"),  # ends early
    ],
    ids=["no-data.pkl", "two-data.pkl", "big-endian", "persistent-id", "truncated-pickle"],
)
def test_malformed_torch_archives_are_refused(tmp_path: Path, archive: dict, message: str):
    path = tmp_path / "ck.pth"
    with zipfile.ZipFile(path, "w") as out:
        for name, data in archive.items():
            out.writestr(name, data)
    with pytest.raises(UnsafeCheckpointError, match=message):
        safe_load(path)


# ------------------------------------------------------------------------------------------------
# Model directories: safetensors only.
@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    mdm = tiny_config().mdm
    torch.manual_seed(0)
    return save_model_dir(tmp_path / "model", NestedUNet(mdm.model), mdm)


def loaders(directory: Path):
    yield lambda: load_model_dir(directory)
    yield lambda: MatryoshkaPipeline.from_pretrained(directory)


def test_a_pickle_in_place_of_the_weights_is_never_unpickled(model_dir: Path, marker: Path, capsys):
    torch_zip(model_dir / WEIGHTS_NAME, payloads(marker)["os.system-via-REDUCE"])
    for load in loaders(model_dir):
        with pytest.raises(ValueError, match=f"{model_dir / WEIGHTS_NAME}: not a readable safetensors file"):
            load()
    code = main(["generate", "--model", str(model_dir), "--class", "1", "--steps", "2", "--quiet",
                 "--out", str(model_dir.parent / "x.png")])
    assert code == 2 and "not a readable safetensors file" in capsys.readouterr().err


def test_pickles_beside_the_weights_are_ignored(model_dir: Path, marker: Path):
    for name in ("pytorch_model.bin", "model.pth", "vis_model.pth"):
        torch_zip(model_dir / name, payloads(marker)["os.system-via-REDUCE"])
    model, _ = load_model_dir(model_dir)
    assert isinstance(model, NestedUNet)
    shutil.move(model_dir / WEIGHTS_NAME, model_dir / "moved.safetensors")  # only a pickle is left
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model_dir(model_dir)


def test_a_config_yaml_with_python_tags_is_refused(model_dir: Path, marker: Path):
    (model_dir / "config.yaml").write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n",
                                           encoding="utf-8")
    for load in loaders(model_dir):
        with pytest.raises(ConfigError, match="not valid YAML"):
            load()


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def with_header(header: dict, payload: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + payload


def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def corrupt(kind: str, path: Path) -> None:
    data = path.read_bytes()
    header, payload = safetensors_parts(path)
    name = first_tensor(header)
    if kind == "truncated":
        path.write_bytes(data[: len(data) - 100])
    elif kind == "header-length-past-the-end":
        path.write_bytes(struct.pack("<Q", len(data) * 10) + data[8:])
    elif kind == "header-length-huge":
        path.write_bytes(struct.pack("<Q", 2**64 - 1) + data[8:])
    elif kind == "offsets-past-the-end":
        end = header[name]["data_offsets"][1]
        header[name]["data_offsets"] = [end, end + 10**6]
        path.write_bytes(with_header(header, payload))
    elif kind == "wrong-dtype":
        header[name]["dtype"] = "float32"
        path.write_bytes(with_header(header, payload))
    elif kind == "shape-disagrees-with-offsets":
        header[name]["shape"] = [s * 2 for s in header[name]["shape"]]
        path.write_bytes(with_header(header, payload))
    elif kind == "header-not-json":
        path.write_bytes(struct.pack("<Q", 12) + b"{'no': json}" + payload)
    elif kind == "empty-file":
        path.write_bytes(b"")
    else:
        raise AssertionError(kind)


MALFORMED = ["truncated", "header-length-past-the-end", "header-length-huge", "offsets-past-the-end", "wrong-dtype",
             "shape-disagrees-with-offsets", "header-not-json", "empty-file"]


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_safetensors_are_refused_naming_the_file(model_dir: Path, kind: str):
    corrupt(kind, model_dir / WEIGHTS_NAME)
    for load in loaders(model_dir):
        with pytest.raises(ValueError, match=f"{model_dir / WEIGHTS_NAME}: not a readable safetensors file"):
            load()


def test_well_formed_weights_for_another_model_are_refused(model_dir: Path):
    weights = dict(NestedUNet(tiny_config().mdm.model).state_dict())
    weights["conv_in.weight"] = torch.zeros(3, 3)
    save_file(weights, str(model_dir / WEIGHTS_NAME))
    with pytest.raises(ConfigError, match=r"wrong shapes \['conv_in.weight \(3, 3\) != "):
        load_model_dir(model_dir)
    weights.pop("conv_in.weight")
    weights["backdoor.weight"] = torch.zeros(1)
    save_file(weights, str(model_dir / WEIGHTS_NAME))
    with pytest.raises(ConfigError, match=r"missing \['conv_in.weight'\], unexpected \['backdoor.weight'\]"):
        MatryoshkaPipeline.from_pretrained(model_dir)
