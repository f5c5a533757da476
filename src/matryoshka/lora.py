"""LoRA adapters on a NestedUNet, through peft: add, train, save, load, scale, fuse and remove them.

    config = LoRAConfig(rank=4, alpha=4)                     # attention q/k/v/out and the FFN, every level
    names = add_adapter(model, config, "fashion-word")       # peft LoRA layers around the chosen modules
    save_adapter(model, "adapter/", config, "fashion-word")  # adapter.safetensors + adapter.yaml (small)
    load_adapter(other_model, "adapter/", "fashion-word", scale=0.8)

A LoRA layer adds scale * (alpha / rank) * B A to a weight W (1x1 and 3x3 convolutions and linear layers
alike); B starts at zero, so a fresh adapter leaves the model's outputs exactly as they were.
`merged_state_dict` gives the plain weights with the active adapters folded in (what a model directory
stores), `remove_adapters` takes every adapter out again, restoring the original modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from matryoshka.typed_config import load_yaml, require, save_yaml

# Module names (the last component) LoRA wraps by default: attention's fused q/k/v and its output, the
# text keys/values of cross-attention, and the FFN's two 1x1 convolutions (ffn.1, ffn.3).
ATTENTION_TARGETS = ("qkv", "proj_out", "kv_cond", "ffn.1", "ffn.3")
CONVOLUTION_TARGETS = ("conv1", "conv2")  # the ResNets' 3x3 convolutions
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.yaml"


@dataclass
class LoRAConfig:
    """Which modules get an adapter and how big it is."""

    rank: int = 4
    alpha: float = 4.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))
    convolutions: bool = False  # also the ResNets' 3x3 convolutions (conv1, conv2)
    levels: list[int] | None = None  # levels to adapt (0 = the outermost band); null = all

    def validate(self) -> None:
        require(self.rank >= 1, "rank", "must be >= 1")
        require(self.alpha > 0, "alpha", "must be positive")
        require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        require(bool(self.targets) or self.convolutions, "targets", "name at least one module (or convolutions)")
        require(self.levels is None or all(level >= 0 for level in self.levels), "levels", "must be >= 0")


@dataclass
class AdapterFile:
    """adapter.yaml: the LoRA config, the modules it wraps, and the levels of the model it was made for."""

    lora: LoRAConfig
    modules: list[str]
    sizes: list[int]


def level_of(module_name: str) -> int:
    """The nesting depth of a module of a NestedUNet (0 = the outermost band), from its name."""
    return len(re.findall(r"(?:^|\.)inner_unet(?=\.|$)", module_name))


def target_modules(model: nn.Module, config: LoRAConfig) -> list[str]:
    """The names of the modules of `model` that `config` adapts."""
    wanted = tuple(config.targets) + (CONVOLUTION_TARGETS if config.convolutions else ())
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d | nn.Linear) or "lora_" in name or name.endswith("base_layer"):
            continue
        if not any(name == target or name.endswith("." + target) for target in wanted):
            continue
        if config.levels is not None and level_of(name) not in config.levels:
            continue
        names.append(name)
    return names


def _peft_config(config: LoRAConfig, modules: list[str]):
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ImportError("LoRA needs peft: pip install 'matryoshka-diffusion[train]'", name="peft") from error
    return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=modules,
                      init_lora_weights=True)


def add_adapter(model: nn.Module, config: LoRAConfig, name: str = "default") -> list[str]:
    """Wrap the targeted modules of `model` with a LoRA adapter called `name` (in place; B = 0, so the
    outputs do not change). Returns the adapted module names."""
    from peft import inject_adapter_in_model

    config.validate()
    modules = target_modules(model, config) if not has_adapters(model) else _adapted_modules(model, config)
    if not modules:
        raise ValueError(f"no module of the model matches the LoRA targets {config.targets} at levels {config.levels}")
    inject_adapter_in_model(_peft_config(config, modules), model, adapter_name=name)
    return modules


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def has_adapters(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def _adapted_modules(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Target names of a model that already holds adapters (its wrapped modules count by their own names)."""
    names = list(lora_layers(model))
    plain = [n for n in target_modules(model, config) if not any(n.startswith(w + ".") for w in names)]
    return sorted(set(names) | set(plain))


def adapter_names(model: nn.Module) -> list[str]:
    names: set[str] = set()
    for layer in lora_layers(model).values():
        names.update(layer.lora_A.keys())
    return sorted(names)


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's own tensors (A and B of every wrapped module), without the adapter's name in the keys."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def save_adapter(model: nn.Module, directory: str | Path, config: LoRAConfig, name: str = "default") -> Path:
    """DIRECTORY/adapter.safetensors + adapter.yaml: what `load_adapter` reads."""
    from matryoshka.model_dir import save_state_dict

    directory = Path(directory)
    modules = sorted(n for n, layer in lora_layers(model).items() if name in layer.lora_A)
    save_state_dict(adapter_state_dict(model, name), directory / ADAPTER_WEIGHTS)
    sizes = list(getattr(getattr(model, "config", None), "sizes", []))
    save_yaml(AdapterFile(config, modules, sizes), directory / ADAPTER_CONFIG)
    return directory


def load_adapter(model: nn.Module, directory: str | Path, name: str = "default", scale: float = 1.0) -> AdapterFile:
    """Add the adapter saved in `directory` to `model` under `name`, at `scale` (1 = as trained)."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    from matryoshka.model_dir import load_state_dict

    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{directory} is not a LoRA adapter directory ({ADAPTER_CONFIG} is missing)")
    saved = load_yaml(AdapterFile, directory / ADAPTER_CONFIG)
    sizes = list(getattr(getattr(model, "config", None), "sizes", []))
    if saved.sizes and sizes and saved.sizes != sizes:
        raise ValueError(f"the adapter in {directory} was made for levels {saved.sizes}, the model has {sizes}")
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}: choose another adapter_name")
    known = {n for n, _ in model.named_modules()}
    missing = [m for m in saved.modules if m not in known]
    if missing:
        raise ValueError(f"the adapter in {directory} wraps modules this model does not have: {missing[:3]}")
    inject_adapter_in_model(_peft_config(saved.lora, saved.modules), model, adapter_name=name)
    result = set_peft_model_state_dict(model, load_state_dict(directory / ADAPTER_WEIGHTS), adapter_name=name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"the adapter in {directory} has tensors the model cannot take: {unexpected[:3]}")
    set_scale(model, name, scale)
    activate(model, adapter_names(model))
    return saved


def set_scale(model: nn.Module, name: str, scale: float) -> None:
    """The adapter's weight in the sum (its alpha / rank times `scale`)."""
    for layer in lora_layers(model).values():
        if name in layer.lora_A:
            layer.set_scale(name, scale)


def activate(model: nn.Module, names: list[str]) -> None:
    """Make exactly these adapters active (their updates add up); the others stay loaded but unused."""
    for layer in lora_layers(model).values():
        layer.set_adapter([n for n in names if n in layer.lora_A])


def fuse(model: nn.Module) -> None:
    """Fold the active adapters into the weights (faster sampling); `unfuse` restores the weights exactly
    (from a copy kept here: subtracting the update again would leave round-off)."""
    for layer in lora_layers(model).values():
        if not layer.merged:
            layer._unfused_weight = layer.get_base_layer().weight.detach().clone()
            layer.merge()


def unfuse(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        if layer.merged:
            layer.unmerge()
            saved = getattr(layer, "_unfused_weight", None)
            if saved is not None:
                with torch.no_grad():
                    layer.get_base_layer().weight.copy_(saved)
                del layer._unfused_weight


def remove_adapters(model: nn.Module) -> None:
    """Take every adapter out of `model`, putting the original modules back (outputs exactly as before)."""
    layers = lora_layers(model)
    unfuse(model)
    for name, layer in sorted(layers.items(), key=lambda item: -item[0].count(".")):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of `model` with its active adapters folded in, under the plain (un-adapted) names."""
    layers = lora_layers(model)
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value.detach().clone()
    for name, layer in layers.items():
        if layer.merged:
            continue  # fused: the base weight already holds the update
        weight_key = f"{name}.weight"
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                state[weight_key] = state[weight_key] + layer.get_delta_weight(adapter).to(state[weight_key].dtype)
    return state


def freeze_all_but_adapters(model: nn.Module) -> list[nn.Parameter]:
    """Train the adapters only: every other parameter stops requiring gradients. Returns the trainable ones."""
    trainable = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
        if parameter.requires_grad:
            trainable.append(parameter)
    return trainable


__all__ = [
    "ATTENTION_TARGETS",
    "AdapterFile",
    "LoRAConfig",
    "activate",
    "adapter_names",
    "adapter_state_dict",
    "add_adapter",
    "freeze_all_but_adapters",
    "fuse",
    "has_adapters",
    "load_adapter",
    "lora_layers",
    "merged_state_dict",
    "remove_adapters",
    "save_adapter",
    "set_scale",
    "target_modules",
    "unfuse",
]
