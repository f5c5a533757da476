"""Apple ml-mdm interop: official configs and checkpoints -> our ModelConfig, DiffusionConfig, weights.

Official configs come as YAML (`unet_config` with nested `inner_config`, `diffusion_config` with its
`sampler_config`) or inside a checkpoint's pickled `args`; both are turned into the same plain dict
first, then translated field by field. Checkpoints are read with `safe_pickle.safe_load`, never
unpickled with code execution. Parameter names of our NestedUNet follow ml-mdm's, so the state dict
loads as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from matryoshka.diffusion import DiffusionConfig
from matryoshka.interop.safe_pickle import PickledObject, safe_load
from matryoshka.models.config import LevelConfig, ModelConfig
from matryoshka.models.unet import NestedUNet


class OfficialConfigError(ValueError):
    """An official config uses something this converter cannot express faithfully."""


# Enum values of ml_mdm.samplers (ScheduleType, PredictionType, ThresholdType).
_ENUMS = {
    "ScheduleType": {0: "COSINE", 2: "DDPM", 3: "DEEPFLOYD", 4: "SIGMOID"},
    "PredictionType": {3: "DDPM", 4: "DDIM", 5: "V_PREDICTION"},
    "ThresholdType": {0: "NONE", 1: "CLIP", 2: "DYNAMIC", 3: "DYNAMIC_IF"},
}
_SCHEDULES = {"DEEPFLOYD": "squaredcos_cap_v2", "COSINE": "cosine_logsnr", "DDPM": "linear"}
_PREDICTIONS = {"DDPM": "eps", "DDIM": "eps", "V_PREDICTION": "v"}
_THRESHOLDS = {"CLIP": "clip", "DYNAMIC": "dynamic", "DYNAMIC_IF": "dynamic_if", "NONE": "none"}


def plain(value: Any) -> Any:
    """Pickled ml-mdm objects (Namespace, config dataclasses, enums) -> plain dicts and strings."""
    if isinstance(value, PickledObject):
        if value.name in _ENUMS and value.args:
            return _ENUMS[value.name].get(value.args[0], str(value.args[0]))
        return {k: plain(v) for k, v in value.fields().items()}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _none(value: Any) -> Any:
    # ml-mdm's argparse turns a YAML "None" into the string "None".
    return None if value in (None, "None", "none", "null") else value


def _int_list(value: Any, length: int | None = None) -> list[int]:
    value = _none(value)
    if value is None:
        return []
    if isinstance(value, str):
        value = [int(v) for v in value.split(",") if v.strip()]
    elif isinstance(value, int):
        value = [value]
    value = [int(v) for v in value]
    if length is not None and len(value) == 1 and length > 1:
        value = value * length
    return value


def _level(cfg: dict, is_core: bool, path: str) -> LevelConfig:
    if cfg.get("temporal_mode"):
        raise OfficialConfigError(f"{path}.temporal_mode: official video models are not supported by the converter")
    channels = _int_list(cfg.get("resolution_channels", "128,256,256,512,1024"))
    n = len(channels)
    attention_levels = _int_list(cfg.get("attention_levels", "2,3"))
    num_layers = _int_list(cfg.get("num_attention_layers", "1"), n)
    resnet = cfg.get("resnet_config") or {}
    micro = _none(cfg.get("micro_conditioning"))
    micro_map = {}
    if micro:
        for item in str(micro).split(","):
            name, default = item.split(":")
            micro_map[name.strip()] = float(default)
    temb = _none(cfg.get("temporal_dim"))
    return LevelConfig(
        channels=channels,
        num_res_blocks=_int_list(cfg.get("num_resnets_per_resolution", "2"), n),
        attention_layers=[num_layers[i] if i in attention_levels else 0 for i in range(n)],
        attention_ffn=bool(resnet.get("use_attention_ffn", False)),
        num_heads=8,
        mid_block=not bool(cfg.get("skip_mid_blocks", not is_core)),
        norm_groups=int(resnet.get("num_groups_norm", 32)),
        attention_norm_groups=32,
        dropout=float(resnet.get("dropout", 0.0)),
        temb_dim=None if temb is None else int(temb),
        micro_conditioning=micro_map,
        normalize_input=(not is_core) and not bool(cfg.get("skip_normalization", False)),
        inner_input=not bool(cfg.get("skip_inner_unet_input", False)),
    )


def convert_config(
    official: dict, text_dim: int | None = None, image_size: int | None = None
) -> tuple[ModelConfig, DiffusionConfig]:
    """Translate an official config (YAML dict or plain() of a checkpoint's args).

    text_dim: width of the text encoder states (FLAN-T5-XL: 2048) when the config leaves it at -1
    (ml-mdm fills it in at run time from the language model); inferred from weights by `load_official`.
    """
    official = plain(official)
    unet = official.get("unet_config")
    if not isinstance(unet, dict):
        raise OfficialConfigError("unet_config: missing; is this an ml-mdm config?")
    chain = [unet]
    while isinstance(chain[-1].get("inner_config"), dict) and str(official.get("model", "nested")).startswith(
        "nested"
    ):
        chain.append(chain[-1]["inner_config"])
    levels = [_level(cfg, i == len(chain) - 1, "unet_config" + ".inner_config" * i) for i, cfg in enumerate(chain)]
    core = chain[-1]

    declared = int(_none(unet.get("conditioning_feature_dim")) or -1)
    dim = declared if declared > 0 else (text_dim or 0)
    proj = int(_none(core.get("conditioning_feature_proj_dim")) or -1)
    if dim > 0 and bool(core.get("skip_cond_emb", False)):
        raise OfficialConfigError("unet_config core: skip_cond_emb with text conditioning cannot run in ml-mdm either")
    model = ModelConfig(
        levels=levels,
        image_size=int(official.get("sample_image_size") or official.get("reader_config", {}).get("image_size", 0)
                       or image_size or 0),
        in_channels=3,
        text_dim=max(dim, 0),
        text_proj_dim=proj if (proj > 0 and dim > 0) else 0,
        pooled_text=True,
        masked_cross_attention=bool(int(core.get("masked_cross_attention", 1))),
        num_text_head_layers=int(core.get("num_lm_head_layers", 0) or 0),
    )
    if image_size:
        model.image_size = image_size
    model.validate()
    return model, _diffusion(official.get("diffusion_config") or {}, len(levels))


def _diffusion(cfg: dict, num_levels: int) -> DiffusionConfig:
    sampler = cfg.get("sampler_config") or {}
    schedule = str(sampler.get("schedule_type", "DDPM")).upper()
    if schedule not in _SCHEDULES:
        raise OfficialConfigError(f"diffusion_config.sampler_config.schedule_type: {schedule} is not supported")
    prediction = _PREDICTIONS.get(str(sampler.get("prediction_type", "DDPM")).upper())
    if prediction is None:
        raise OfficialConfigError(f"diffusion_config.sampler_config.prediction_type: {sampler['prediction_type']}")
    # Unknown loss targets (e.g. HA_STYLE in a released YAML) only matter for training: use the prediction.
    target = _PREDICTIONS.get(str(_none(sampler.get("loss_target_type")) or "").upper(), prediction)
    if float(cfg.get("model_output_scale", 0) or 0) != 0:
        raise OfficialConfigError("diffusion_config.model_output_scale != 0 (tanh output scaling) is not supported")
    if num_levels > 1 and not bool(cfg.get("no_use_residual", False)):
        raise OfficialConfigError(
            "diffusion_config.no_use_residual: false (residual low-res prediction) is not supported; "
            "ml-mdm's own implementation of it cannot run (it refers to an undefined name)"
        )
    weights = _none(cfg.get("multi_res_weights"))
    level_weights = [float(w) for w in str(weights).split(":")] if weights else None
    if num_levels > 1 and not bool(cfg.get("use_double_loss", False)):
        level_weights = [level_weights[0] if level_weights else 1.0] + [0.0] * (num_levels - 1)
    mixed = _none(cfg.get("mixed_ratio"))
    mixed_ratio = None
    if mixed:
        parts = [float(x) for x in str(mixed).split(":")]
        total, running, mixed_ratio = sum(parts), 0.0, []
        for p in parts:
            running += p
            mixed_ratio.append(running / total)
    rescale_signal = _none(sampler.get("rescale_signal"))
    return DiffusionConfig(
        schedule=_SCHEDULES[schedule],
        num_train_steps=int(sampler.get("num_diffusion_steps", 1000)),
        beta_start=float(sampler.get("beta_start", 1e-4)),
        beta_end=float(sampler.get("beta_end", 0.02)),
        # ml-mdm rescales only by factors above 1 (get_schedule_shifted); a smaller one leaves it unshifted
        base_snr_scale=max(1.0, float(_none(sampler.get("rescale_schedule")) or 1.0)),
        shift_schedule=bool(sampler.get("schedule_shifted", False)),
        shift_power=float(sampler.get("schedule_shifted_power", 1.0)),
        prediction=prediction,
        loss_target=target,
        loss_weighting="vdm" if cfg.get("use_vdm_loss_weights", False) else "none",
        level_weights=level_weights,
        mixed_ratio=mixed_ratio,
        threshold=_THRESHOLDS[str(sampler.get("threshold_function", "CLIP")).upper()],
        rescale_signal=float(rescale_signal) if rescale_signal else 1.0,
    )


def _infer_text_dim(state_dict: dict[str, torch.Tensor]) -> int | None:
    core_keys = sorted((k for k in state_dict if k.endswith(("lm_proj.weight", "cond_emb.weight"))), key=len)
    for key in reversed(core_keys):  # the deepest module is the core
        return int(state_dict[key].shape[1])
    return None


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, plain args dict) of an official checkpoint, read without executing its pickle."""
    checkpoint = safe_load(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise OfficialConfigError(f"{path}: not an ml-mdm checkpoint (no 'state_dict' entry)")
    state_dict = {k: v for k, v in checkpoint["state_dict"].items() if isinstance(v, torch.Tensor)}
    args = plain(checkpoint.get("args")) or {}
    return state_dict, args if isinstance(args, dict) else {}


def load_official(
    checkpoint: str | Path, config: str | Path | dict | None = None, text_dim: int | None = None
) -> tuple[NestedUNet, ModelConfig, DiffusionConfig]:
    """Load an official ml-mdm checkpoint (vis_model.pth) into our NestedUNet.

    config: the official YAML (path or dict); None = the config pickled inside the checkpoint.
    Every parameter must match by name and shape; leftovers are an error, not silently dropped.
    """
    state_dict, args = read_checkpoint(checkpoint)
    if config is None:
        if not args:
            raise OfficialConfigError(f"{checkpoint}: no config inside; pass the official YAML with --config")
        official = args
    elif isinstance(config, dict):
        official = config
    else:
        with open(config, encoding="utf-8") as handle:
            official = yaml.safe_load(handle)
    model_config, diffusion_config = convert_config(official, text_dim or _infer_text_dim(state_dict))
    model = NestedUNet(model_config)
    # interp_conditioning layers exist in some official models but are never used in their forward.
    state_dict = {k: v for k, v in state_dict.items() if "interp_layer" not in k}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [k for k in expected if k in state_dict and tuple(expected[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or mismatched:
        raise OfficialConfigError(
            "checkpoint does not match its config: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"shape mismatch {[(k, tuple(state_dict[k].shape), tuple(expected[k].shape)) for k in mismatched[:5]]}"
        )
    model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return model.eval(), model_config, diffusion_config
