"""The official TransNormerLLM checkpoint format, both ways: config fields, the tensor layout, the tie rule.

Parameter names are the same in both formats (tnl_spec.md section 3), so converting the weights is a check
plus an optional dtype cast. What differs is the config (official field names, no model_type, auto_map to
the official remote code) and how the tied embedding is stored: the released `.bin` files carry both
`model.embed_tokens.weight` and `lm_head.weight`, safetensors written by transformers keep only the first.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import PreTrainedConfig

from transnormer_hf import TransNormerLLMConfig, TransNormerLLMForCausalLM
from transnormer_hf.configuration_transnormer import OFFICIAL_ALIASES, OFFICIAL_IGNORED_KEYS, OFFICIAL_MODEL_TYPE

from .checkpoint import TensorInfo

EMBED_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"
# Fields an official config.json carries that no model reads (tnl_spec.md section 2); dropped on conversion.
OFFICIAL_UNUSED_KEYS = set(OFFICIAL_IGNORED_KEYS) | {"model_max_length"}
OUR_FIELDS = set(inspect.signature(TransNormerLLMConfig.__init__).parameters) - {"self", "kwargs"}
GENERIC_FIELDS = set(PreTrainedConfig().to_dict()) | {"torch_dtype", "layer_types", "_from_model_config"}
OFFICIAL_AUTO_MAP = {
    "AutoConfig": "configuration_transnormer.TransnormerConfig",
    "AutoModelForCausalLM": "modeling_transnormer.TransnormerForCausalLM",
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def config_from_dict(config_dict: dict[str, Any]) -> TransNormerLLMConfig:
    """Our config from an official or our own config.json; unknown or contradictory fields are a ValueError."""
    model_type = config_dict.get("model_type", OFFICIAL_MODEL_TYPE)
    if model_type not in (OFFICIAL_MODEL_TYPE, TransNormerLLMConfig.model_type):
        raise ValueError(
            f"config.json has model_type {model_type!r}; expected {OFFICIAL_MODEL_TYPE!r} (official), "
            f"{TransNormerLLMConfig.model_type!r} (ours) or none"
        )
    known = OUR_FIELDS | set(OFFICIAL_ALIASES) | {"no_scale_embedding"} | OFFICIAL_UNUSED_KEYS | GENERIC_FIELDS
    unknown = sorted(set(config_dict) - known)
    if unknown:
        raise ValueError(f"config.json has unknown field(s) {unknown}; refusing to guess what they mean")
    for official, ours in OFFICIAL_ALIASES.items():
        if official in config_dict and ours in config_dict and config_dict[official] != config_dict[ours]:
            raise ValueError(
                f"contradictory config.json: {ours}={config_dict[ours]!r} but {official}={config_dict[official]!r}"
            )
    if "no_scale_embedding" in config_dict and "scale_embedding" in config_dict:
        if bool(config_dict["no_scale_embedding"]) == bool(config_dict["scale_embedding"]):
            raise ValueError(
                f"contradictory config.json: scale_embedding={config_dict['scale_embedding']!r} but "
                f"no_scale_embedding={config_dict['no_scale_embedding']!r}"
            )
    fields = {key: value for key, value in config_dict.items()
              if key not in OFFICIAL_UNUSED_KEYS and key not in ("model_type", "transformers_version", "_name_or_path")}
    dtype = fields.pop("torch_dtype", None)
    fields.setdefault("dtype", dtype)
    return TransNormerLLMConfig(**fields)


def official_config_dict(config: TransNormerLLMConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The config.json the official remote code reads (no model_type, official names, auto_map).

    Configs the official code cannot express exactly are refused (tnl_spec.md section 10).
    """
    if config.num_hidden_layers < 2:
        raise ValueError("the official code divides by num_hidden_layers - 1: one layer cannot be exported to it")
    if any(config.lrpe_layers) and config.attention_hidden_size != config.hidden_size:
        raise ValueError(
            "the official code sizes LRPE from hidden_size: with LRPE, attention_hidden_size must equal hidden_size "
            f"({config.attention_hidden_size} != {config.hidden_size})"
        )
    if config.rms_norm_eps != 1e-6:
        raise ValueError(f"the official SRMSNorm uses eps 1e-6; this model has rms_norm_eps={config.rms_norm_eps}")
    if not config.tie_word_embeddings:
        raise ValueError("the official model ties lm_head to the embeddings; this model has untied embeddings")
    return {
        "architectures": ["TransnormerForCausalLM"],
        "auto_map": dict(OFFICIAL_AUTO_MAP),
        "add_bos_token": False,
        "bias": config.use_bias,
        "bos_token_id": config.bos_token_id,
        "decoder_attention_heads": config.num_attention_heads,
        "decoder_embed_dim": config.hidden_size,
        "decoder_layers": config.num_hidden_layers,
        "eos_token_id": config.eos_token_id,
        "glu_dim": config.intermediate_size,
        "hidden_dim": config.attention_hidden_size,
        "init_std": config.initializer_range,
        "linear_act_fun": config.hidden_act,
        "linear_use_lrpe_list": list(config.lrpe_layers),
        "no_scale_embedding": not config.scale_embedding,
        "norm_type": config.norm_type,
        "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": config.use_cache,
        "vocab_size": config.vocab_size,
    }


def expected_shapes(config: TransNormerLLMConfig) -> dict[str, tuple[int, ...]]:
    """name -> shape of every parameter of the model `config` describes (both tied keys), built on meta."""
    with torch.device("meta"):
        model = TransNormerLLMForCausalLM(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_layout(infos: dict[str, TensorInfo], config: TransNormerLLMConfig, where: str) -> None:
    """Missing keys, extra keys, wrong shapes or non-float tensors in a checkpoint: one ValueError listing them."""
    expected = expected_shapes(config)
    present = set(infos)
    missing = set(expected) - present
    if config.tie_word_embeddings and len(missing & {EMBED_KEY, LM_HEAD_KEY}) == 1:
        missing -= {EMBED_KEY, LM_HEAD_KEY}  # tied: either key is enough (tnl_spec.md section 3)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {sorted(missing)[:5]}")
    extra = sorted(present - set(expected))
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s): {extra[:5]}")
    wrong = [f"{name} {infos[name].shape} (expected {expected[name]})"
             for name in sorted(present & set(expected)) if infos[name].shape != expected[name]]
    if wrong:
        problems.append(f"wrong shape(s): {wrong[:5]}")
    not_float = [f"{name} ({infos[name].dtype})" for name in infos if not infos[name].dtype.is_floating_point]
    if not_float:
        problems.append(f"non-float tensor(s): {not_float[:5]}")
    if problems:
        raise ValueError(f"{where} does not match its config: " + "; ".join(problems))


def tie_source(infos: dict[str, TensorInfo], config: TransNormerLLMConfig) -> str | None:
    """With tied embeddings, the key the shared tensor is read from; None for untied models."""
    if not config.tie_word_embeddings:
        return None
    return EMBED_KEY if EMBED_KEY in infos else LM_HEAD_KEY


def cast_exactly(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` in `dtype` (None keeps it); refuses a cast that turns finite values into inf."""
    if dtype is None or tensor.dtype == dtype:
        return tensor
    cast = tensor.to(dtype)
    if not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(tensor).all()):
        raise ValueError(f"casting {name} to {dtype} overflows (values beyond the dtype's range); choose a wider --dtype")
    return cast
