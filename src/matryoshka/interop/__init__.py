"""Interop with Apple's ml-mdm: safe checkpoint reading and config translation."""

from matryoshka.interop.mlmdm import OfficialConfigError, convert_config, load_official, read_checkpoint
from matryoshka.interop.safe_pickle import PickledObject, UnsafeCheckpointError, safe_load

__all__ = [
    "OfficialConfigError",
    "PickledObject",
    "UnsafeCheckpointError",
    "convert_config",
    "load_official",
    "read_checkpoint",
    "safe_load",
]
