"""Building a text encoder from a spec string or a `to_config()` dict.

A model directory records the encoder it was trained with (the pipeline writes `encoder.to_config()`
to text_encoder.yaml) and `load_text_encoder` rebuilds it. Spec strings are the short form for CLIs:

    "minilm"                  the bundled all-MiniLM-L6-v2 (offline default)
    "minilm:/path/to/dir"     a local copy of it
    "t5"                      google/flan-t5-xl, the official MDM encoder
    "t5:google/flan-t5-xl"    any T5 hub id ...
    "t5:/local/path"          ... or directory
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from matryoshka.conditioning.base import TextEncoder

DEFAULT_TEXT_ENCODER = "minilm"


@dataclass(frozen=True)
class EncoderType:
    """How to build one kind of encoder: its class and the constructor argument a spec's tail fills."""

    encoder_class: type[TextEncoder]
    spec_argument: str


def _builtin_types() -> dict[str, EncoderType]:
    from matryoshka.conditioning.minilm import MiniLMTextEncoder
    from matryoshka.conditioning.t5 import T5TextEncoder

    return {
        "t5": EncoderType(T5TextEncoder, "name_or_path"),
        "minilm": EncoderType(MiniLMTextEncoder, "path"),
    }


_TYPES: dict[str, EncoderType] = _builtin_types()


def register_text_encoder(type_name: str, encoder_class: type[TextEncoder], spec_argument: str) -> None:
    """Makes `load_text_encoder` know `type_name` ("type" in configs, the prefix of spec strings)."""
    if type_name in _TYPES:
        raise ValueError(f"text encoder type {type_name!r} is already registered")
    _TYPES[type_name] = EncoderType(encoder_class, spec_argument)


def parse_spec(spec: str) -> dict[str, Any]:
    """Spec string to config: "t5:org/model" -> {"type": "t5", "name_or_path": "org/model"}."""
    type_name, separator, argument = spec.strip().partition(":")
    if type_name not in _TYPES:
        raise ValueError(f"unknown text encoder {spec!r}: the type must be one of {sorted(_TYPES)}")
    config: dict[str, Any] = {"type": type_name}
    if separator:
        if not argument:
            raise ValueError(f"text encoder spec {spec!r} has an empty name or path after ':'")
        config[_TYPES[type_name].spec_argument] = argument
    return config


def load_text_encoder(config_or_spec: str | Mapping[str, Any], **overrides: Any) -> TextEncoder:
    """Builds the encoder a spec string or a `to_config()` dict describes.

    `overrides` replace config entries (e.g. `dtype="bfloat16"` on a GPU machine).
    """
    if isinstance(config_or_spec, str):
        config = parse_spec(config_or_spec)
    elif isinstance(config_or_spec, Mapping):
        config = dict(config_or_spec)
    else:
        raise TypeError(
            f"load_text_encoder takes a spec string or a config dict; got {type(config_or_spec).__name__}"
        )
    config.update(overrides)
    type_name = config.pop("type", None)
    if type_name is None:
        raise ValueError(f"text encoder config {dict(config_or_spec)!r} has no 'type' entry")
    if type_name not in _TYPES:
        raise ValueError(f"unknown text encoder type {type_name!r}; known types: {sorted(_TYPES)}")
    encoder_class = _TYPES[type_name].encoder_class
    accepted = set(inspect.signature(encoder_class.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ValueError(
            f"unknown entries {unknown} in the config of text encoder type {type_name!r}; "
            f"accepted: {sorted(accepted)}"
        )
    return encoder_class(**config)
