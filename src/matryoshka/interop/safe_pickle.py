"""Read torch checkpoints (zip format) without executing anything from the pickle.

`torch.load(weights_only=False)` runs whatever callables a pickle names; `weights_only=True` refuses
the config objects that ml-mdm checkpoints carry (argparse.Namespace of ml_mdm dataclasses, pickled
under module paths that no longer exist). This unpickler does neither:

- tensors are rebuilt by our own code from the raw storages in the zip archive;
- a short allow-list of harmless globals (OrderedDict, torch.Size, ...) is resolved to safe values;
- any other *class* from a non-standard-library module becomes an inert `PickledObject` that only
  records its module, name, arguments and state (no constructor, no __setstate__ of the real class);
- everything else -- functions, standard-library or torch internals (os.system, builtins.eval,
  subprocess.Popen, torch.load ...) -- is refused with `UnsafeCheckpointError` naming the global.
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The pickle names something that could run code, or is not a checkpoint we can read."""


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}

# Standard-library and framework modules: nothing from them is instantiated unless allow-listed.
_REFUSED_ROOTS = set(sys.stdlib_module_names) | {"torch", "numpy", "pickle", "dill", "joblib", "cloudpickle"}


@dataclass
class PickledObject:
    """An inert record of an object from a pickle: what it was, and the data it carried."""

    module: str
    name: str
    args: tuple = ()
    state: Any = None
    items: dict = field(default_factory=dict)

    def __setstate__(self, state: Any) -> None:  # called by pickle's BUILD opcode
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def fields(self) -> dict:
        """The object's attributes (dataclass / Namespace state), or {}."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            merged = dict(state[0] or {})
            merged.update(state[1])
            return merged
        return dict(state) if isinstance(state, dict) else {}


def _record_class(module: str, name: str) -> type:
    """A stand-in class: calling it (REDUCE) or NEWOBJ-ing it records the arguments, nothing more."""

    def new(cls, *args, **kwargs):
        return PickledObject(module, name, args)

    return type(name, (), {"__new__": new, "__module__": "matryoshka.interop.safe_pickle.records"})


@dataclass
class _StorageRef:
    data: torch.Tensor  # flat, typed


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _StorageRef):
        raise UnsafeCheckpointError("tensor rebuilt from something that is not a storage")
    flat = storage.data
    needed = offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True)) + 1 if len(size) else offset + 1
    if any(s == 0 for s in size):
        return torch.empty(tuple(size), dtype=flat.dtype)
    if needed > flat.numel():
        raise UnsafeCheckpointError(f"tensor of size {tuple(size)} reads past its storage ({flat.numel()} elements)")
    return torch.as_strided(flat, tuple(size), tuple(stride), offset)


def _rebuild_parameter(data, requires_grad=False, hooks=None, *extra):
    return data


def _safe_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafeCheckpointError(f"unexpected encoding {encoding!r} in _codecs.encode")
    return text.encode(encoding)


def _numpy_scalar(dtype: Any, data: bytes) -> Any:
    if isinstance(dtype, PickledObject):
        dtype = dtype.args[0] if dtype.args else None
    if not isinstance(dtype, str) or not isinstance(data, bytes):
        raise UnsafeCheckpointError("malformed numpy scalar in checkpoint")
    return np.frombuffer(data, dtype=np.dtype(dtype))[0].item()


def _numpy_dtype(spec: str, *args: Any) -> PickledObject:
    return PickledObject("numpy", "dtype", (str(spec),))


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("_codecs", "encode"): _safe_encode,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
    ("argparse", "Namespace"): _record_class("argparse", "Namespace"),
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storages: dict[str, _StorageRef], read_record) -> None:
        super().__init__(io.BytesIO(data))
        self._storages = storages
        self._read_record = read_record

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return ("storage-type", _STORAGE_DTYPES[name])
        root = module.split(".")[0]
        if root not in _REFUSED_ROOTS and name[:1].isupper() and name.isidentifier() and "__" not in name:
            return _record_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load global {module}.{name}: the checkpoint asks to call it, and only plain data "
            "(tensors, numbers, strings, containers and inert config records) is accepted"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if isinstance(storage_type, tuple) and storage_type[0] == "storage-type":
            dtype = storage_type[1]
        else:
            dtype = getattr(storage_type, "dtype", None)
            if not isinstance(dtype, torch.dtype):
                raise UnsafeCheckpointError(f"unknown storage type {storage_type!r}")
        key = str(key)
        if key not in self._storages:
            raw = self._read_record(f"data/{key}")
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(raw) < numel * itemsize:
                raise UnsafeCheckpointError(f"storage {key} is truncated ({len(raw)} bytes for {numel} elements)")
            flat = torch.frombuffer(bytearray(raw[: numel * itemsize]), dtype=dtype) if numel else torch.empty(
                0, dtype=dtype
            )
            self._storages[key] = _StorageRef(flat)
        return self._storages[key]


def safe_load(path: str | Path) -> Any:
    """Load a torch zip checkpoint as plain data; see the module docstring for what is refused."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpointError(
            f"{path} is not a torch zip checkpoint (legacy pre-1.6 format or not a checkpoint at all); "
            "re-save it with a recent torch in a trusted environment first"
        )
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise UnsafeCheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pkl)}")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in names and archive.read(byteorder).strip() not in (b"little", b""):
            raise UnsafeCheckpointError(f"{path}: big-endian checkpoints are not supported")

        def read_record(name: str) -> bytes:
            try:
                return archive.read(prefix + name)
            except KeyError:
                raise UnsafeCheckpointError(f"{path}: missing record {name}") from None

        unpickler = _RestrictedUnpickler(archive.read(pkl[0]), {}, read_record)
        try:
            return unpickler.load()
        except UnsafeCheckpointError:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError) as err:
            raise UnsafeCheckpointError(f"{path}: malformed checkpoint pickle ({err})") from None
