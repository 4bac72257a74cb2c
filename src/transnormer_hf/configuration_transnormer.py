"""TransNormerLLMConfig: typed fields with transformers names, the official names as aliases, validation."""

from __future__ import annotations

import inspect
from typing import Any

from transformers import PreTrainedConfig

# Activations the official `get_activation_fn` knows (tnl_spec.md section 2). The official code maps any
# other string to identity silently; we ask for "none" explicitly and reject the rest.
ACTIVATIONS = ("silu", "swish", "gelu", "relu", "elu", "sigmoid", "exp", "leak", "1+elu", "2+elu", "sine", "none")
NORM_TYPES = ("simplermsnorm", "layernorm")

# Official field name -> our field name (values carried over unchanged).
OFFICIAL_ALIASES = {
    "decoder_embed_dim": "hidden_size",
    "decoder_layers": "num_hidden_layers",
    "decoder_attention_heads": "num_attention_heads",
    "hidden_dim": "attention_hidden_size",
    "glu_dim": "intermediate_size",
    "linear_use_lrpe_list": "lrpe_layers",
    "linear_act_fun": "hidden_act",
    "init_std": "initializer_range",
    "bias": "use_bias",
}
# Keys an official config.json carries that mean nothing to this model: the official model writes
# `linear_use_lrpe` (the last layer's flag) onto its config, `add_bos_token` is tokenizer-side, and
# `auto_map`/`architectures` point at the official remote code.
OFFICIAL_IGNORED_KEYS = ("linear_use_lrpe", "add_bos_token", "auto_map", "architectures")
OFFICIAL_MODEL_TYPE = "transnormer"
# Fields checked again whenever they are assigned after construction (see TransNormerLLMConfig.__setattr__).
CHECKED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "attention_hidden_size",
                  "intermediate_size", "hidden_act", "lrpe_layers", "norm_type", "rms_norm_eps", "initializer_range",
                  "attention_backend", "loss_chunk_size", "cuda_graph_decoding")

# Released OpenNLPLab sizes (tnl_spec.md section 2). 385M's config.json was never published: these are
# the config-class defaults, which match its parameter count; its activation and scale are unverified.
PRESETS: dict[str, dict[str, Any]] = {
    "385M": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=8, attention_hidden_size=1024,
                 intermediate_size=2816, scale_embedding=True),
    "1B": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, attention_hidden_size=2048,
               intermediate_size=5632, scale_embedding=True),
    "7B": dict(hidden_size=4096, num_hidden_layers=30, num_attention_heads=32, attention_hidden_size=4096,
               intermediate_size=11008, scale_embedding=False),
}


class TransNormerLLMConfig(PreTrainedConfig):
    """Configuration of a TransNormerLLM (TNL) model.

    Args:
        vocab_size: vocabulary size (official 64000, the Baichuan SentencePiece vocabulary).
        hidden_size: model width d (official `decoder_embed_dim`).
        num_hidden_layers: number of decoder layers L (official `decoder_layers`).
        num_attention_heads: number of heads H (official `decoder_attention_heads`).
        attention_hidden_size: inner width of the token mixer; q, k, v and the gate u are each this
            wide (official `hidden_dim`). Defaults to `hidden_size`.
        intermediate_size: SGLU inner width (official `glu_dim`; -1 means `hidden_size`).
        hidden_act: activation on q and k (official `linear_act_fun`): one of `ACTIVATIONS`.
        lrpe_layers: one 0/1 flag per layer switching LRPE on (official `linear_use_lrpe_list`).
            Defaults to LRPE on layer 0 only, as in every released checkpoint.
        scale_embedding: multiply embeddings by sqrt(hidden_size) (official `no_scale_embedding`, inverted).
        norm_type: "simplermsnorm" (no parameters) or "layernorm".
        rms_norm_eps: epsilon of SRMSNorm (the official torch SRMSNorm uses 1e-6).
        use_bias: biases on the token and channel mixer projections (official `bias`).
        initializer_range: std of the normal init of linear and embedding weights (official `init_std`).
        attention_backend: "auto" (Triton on CUDA when available, torch otherwise), "torch" or "triton".
        loss_chunk_size: 0 (off) or the rows per chunk of a fused lm_head + cross-entropy used in training: the loss
            comes straight from the hidden states, the full logits are never built, and `logits` is None.
        cuda_graph_decoding: on CUDA, `generate()` runs greedy decoding and sampling through one CUDA graph per
            generation with the stop check off the critical path (same tokens); False keeps transformers' loop.
    """

    model_type = "transnormer_llm"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {official: ours for official, ours in OFFICIAL_ALIASES.items()}
    # Tensor parallelism (`from_pretrained(..., tp_plan="auto")`) shards the SGLU channel mixer only: l1 and l2
    # column-wise (l1(x) * l2(x) is elementwise, so matching shards multiply locally) and l3 row-wise (one
    # all-reduce). The token mixer stays replicated: the fused qkvu_proj is chunked into q|k|v|u, which a plain
    # column split would cut across the four, and SRMSNorm normalises over all heads jointly, so a head-sharded
    # mixer would need a custom norm with its own all-reduce. Splitting qkvu_proj into four linears would
    # break loading released checkpoints by their official names.
    base_model_tp_plan = {
        "layers.*.channel_mixer.l1": "colwise",
        "layers.*.channel_mixer.l2": "colwise",
        "layers.*.channel_mixer.l3": "rowwise",
    }

    def __init__(
        self,
        vocab_size: int = 64000,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 8,
        attention_hidden_size: int | None = None,
        intermediate_size: int = 2816,
        hidden_act: str = "silu",
        lrpe_layers: list[int] | None = None,
        scale_embedding: bool = True,
        norm_type: str = "simplermsnorm",
        rms_norm_eps: float = 1e-6,
        use_bias: bool = False,
        initializer_range: float = 0.02,
        attention_backend: str = "auto",
        loss_chunk_size: int = 0,
        cuda_graph_decoding: bool = True,
        use_cache: bool = True,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        tie_word_embeddings: bool = True,
        **kwargs: Any,
    ) -> None:
        given = dict(
            vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads, attention_hidden_size=attention_hidden_size,
            intermediate_size=intermediate_size, hidden_act=hidden_act, lrpe_layers=lrpe_layers,
            initializer_range=initializer_range, use_bias=use_bias,
        )
        _apply_official_aliases(given, kwargs)
        if "no_scale_embedding" in kwargs:
            scale_embedding = not bool(kwargs.pop("no_scale_embedding"))
        # auto_map/architectures go only when they name the official remote code ("Transnormer..."): an exported
        # remote-code bundle (conversion/remote_code.py) is dispatched through its own auto_map.
        keep = () if "TransnormerConfig" in str(kwargs.get("auto_map")) else ("auto_map", "architectures")
        for key in OFFICIAL_IGNORED_KEYS:
            if key not in keep:
                kwargs.pop(key, None)
        kwargs.pop("layer_types", None)  # derived from num_hidden_layers; a saved copy is not trusted
        head_dim = kwargs.pop("head_dim", None)

        self.vocab_size = given["vocab_size"]
        self.hidden_size = given["hidden_size"]
        self.num_hidden_layers = given["num_hidden_layers"]
        self.num_attention_heads = given["num_attention_heads"]
        self.attention_hidden_size = given["attention_hidden_size"]
        if head_dim is not None:
            _check_head_dim(head_dim)
            if self.attention_hidden_size is None and isinstance(self.num_attention_heads, int):
                self.attention_hidden_size = head_dim * self.num_attention_heads
            elif self.attention_hidden_size != head_dim * self.num_attention_heads:
                raise ValueError(
                    f"head_dim ({head_dim}) must be attention_hidden_size / num_attention_heads "
                    f"({self.attention_hidden_size} / {self.num_attention_heads}); give one of them"
                )
        if self.attention_hidden_size is None:
            self.attention_hidden_size = self.hidden_size
        self.intermediate_size = given["intermediate_size"]
        if self.intermediate_size == -1:
            self.intermediate_size = self.hidden_size
        self.hidden_act = given["hidden_act"]
        self.lrpe_layers = given["lrpe_layers"]
        if self.lrpe_layers is None and isinstance(self.num_hidden_layers, int):
            self.lrpe_layers = [1] + [0] * (self.num_hidden_layers - 1)
        self.scale_embedding = scale_embedding
        self.norm_type = norm_type
        self.rms_norm_eps = rms_norm_eps
        self.use_bias = given["use_bias"]
        self.initializer_range = given["initializer_range"]
        self.attention_backend = attention_backend
        self.loss_chunk_size = loss_chunk_size
        self.cuda_graph_decoding = cuda_graph_decoding
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.tie_word_embeddings = tie_word_embeddings
        self._validate()
        self.lrpe_layers = [int(flag) for flag in self.lrpe_layers]
        super().__init__(**kwargs)
        self._check_assignments = True

    def __setattr__(self, key: str, value: Any) -> None:
        # transformers sets from_pretrained's overrides, and users set fields, after construction: such an assignment
        # is checked like a constructor argument and a refused one leaves the config as it was. A new layer count
        # carries lrpe_layers along (the layers kept keep their flags, added layers get 0).
        key = self.attribute_map.get(key, key)
        if key not in CHECKED_FIELDS or not self.__dict__.get("_check_assignments", False):
            super().__setattr__(key, value)
            return
        previous = {name: self.__dict__[name] for name in (key, "lrpe_layers")}
        super().__setattr__(key, value)
        if key == "num_hidden_layers" and isinstance(value, int) and value > 0:
            super().__setattr__("lrpe_layers", follow_layer_count(previous["lrpe_layers"], value))
        try:
            self._validate()
        except ValueError:
            for name, old in previous.items():
                super().__setattr__(name, old)
            raise
        if key == "lrpe_layers":
            super().__setattr__("lrpe_layers", [int(flag) for flag in value])

    def to_dict(self) -> dict[str, Any]:
        """As `PreTrainedConfig.to_dict`, without this class's bookkeeping flag."""
        output = super().to_dict()
        output.pop("_check_assignments", None)
        return output

    @property
    def layer_types(self) -> list[str]:
        """Every layer is a linear-attention layer; generic transformers code (mask creation, context parallel) reads
        this. Derived, so it always has one entry per layer."""
        return ["linear_attention"] * self.num_hidden_layers

    @property
    def head_dim(self) -> int:
        """Per-head width of q, k and v before LRPE (LRPE doubles q and k): attention_hidden_size / heads. Setting it
        sets attention_hidden_size (as `head_dim=` does in the constructor)."""
        return self.attention_hidden_size // self.num_attention_heads

    @head_dim.setter
    def head_dim(self, value: int) -> None:
        _check_head_dim(value)
        self.attention_hidden_size = value * self.num_attention_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "TransNormerLLMConfig":
        """The config of a released size ("385M", "1B" or "7B"), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "TransNormerLLMConfig":
        """As `PreTrainedConfig.from_dict`, but overrides of this config's fields (`from_pretrained(path,
        num_hidden_layers=2)`, official names included) go through the constructor together with the saved fields:
        checked as constructor arguments, in any order, with the saved lrpe_layers following a new layer count."""
        overrides = {}
        for key in list(kwargs):
            field = OFFICIAL_ALIASES.get(key, "scale_embedding" if key == "no_scale_embedding" else key)
            if field in CONSTRUCTOR_FIELDS:
                value = kwargs.pop(key)
                overrides[field] = (not value) if key == "no_scale_embedding" else value
        if not overrides:
            return super().from_dict(config_dict, **kwargs)
        fields = {OFFICIAL_ALIASES.get(key, key): value for key, value in config_dict.items()}
        if "no_scale_embedding" in fields:
            fields["scale_embedding"] = not fields.pop("no_scale_embedding")
        layers = overrides.get("num_hidden_layers")
        if isinstance(layers, int) and layers > 0 and "lrpe_layers" not in overrides and fields.get("lrpe_layers"):
            fields["lrpe_layers"] = follow_layer_count(fields["lrpe_layers"], layers)
        if "head_dim" in overrides and "attention_hidden_size" not in overrides:
            fields.pop("attention_hidden_size", None)  # the new head width sets it
        return super().from_dict({**fields, **overrides}, **kwargs)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> tuple[dict, dict]:
        # Official checkpoints say model_type "transnormer" (or nothing) and point auto_map at remote
        # code; read them as ours so the class's from_pretrained loads them without warnings.
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type", OFFICIAL_MODEL_TYPE) == OFFICIAL_MODEL_TYPE:
            config_dict = {key: value for key, value in config_dict.items()
                           if key not in OFFICIAL_IGNORED_KEYS and key != "model_type"}
        return config_dict, kwargs

    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "attention_hidden_size", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.attention_hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must divide attention_hidden_size "
                f"({self.attention_hidden_size})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}; got {self.hidden_act!r}")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {NORM_TYPES}; got {self.norm_type!r}")
        if not isinstance(self.lrpe_layers, (list, tuple)) or len(self.lrpe_layers) != self.num_hidden_layers:
            raise ValueError(
                f"lrpe_layers must be a list with one 0/1 flag per layer ({self.num_hidden_layers}); "
                f"got {self.lrpe_layers!r}"
            )
        if any(flag not in (0, 1, True, False) for flag in self.lrpe_layers):
            raise ValueError(f"lrpe_layers entries must be 0 or 1; got {self.lrpe_layers!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be positive; got {self.rms_norm_eps!r}")
        if not self.initializer_range >= 0:
            raise ValueError(f"initializer_range must be >= 0; got {self.initializer_range!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be 'auto', 'torch' or 'triton'; got {self.attention_backend!r}")
        chunk = self.loss_chunk_size
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
            raise ValueError(f"loss_chunk_size must be a non-negative integer (0 = off); got {self.loss_chunk_size!r}")
        if not isinstance(self.cuda_graph_decoding, bool):
            raise ValueError(f"cuda_graph_decoding must be True or False; got {self.cuda_graph_decoding!r}")


def follow_layer_count(flags: list[int], num_layers: int) -> list[int]:
    """Per-layer flags for a new layer count: the layers kept keep theirs, added layers get 0 (every released
    checkpoint's flag after the first layer)."""
    return list(flags[:num_layers]) + [0] * (num_layers - len(flags))


def _check_head_dim(value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"head_dim must be a positive integer; got {value!r}")


def _apply_official_aliases(given: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """Move official field names from `kwargs` into `given`; a contradiction is a ValueError."""
    defaults = TransNormerLLMConfig.__init__.__defaults__
    names = TransNormerLLMConfig.__init__.__code__.co_varnames[1 : 1 + len(defaults)]
    default_of = dict(zip(names, defaults))
    for official, ours in OFFICIAL_ALIASES.items():
        if official not in kwargs:
            continue
        value = kwargs.pop(official)
        if given[ours] != default_of[ours] and given[ours] != value:
            raise ValueError(
                f"contradictory config: {ours}={given[ours]!r} but its official alias {official}={value!r}"
            )
        given[ours] = value


# The constructor's fields (official aliases aside): what `from_dict` passes through the constructor.
CONSTRUCTOR_FIELDS = frozenset(inspect.signature(TransNormerLLMConfig.__init__).parameters) - {"self", "kwargs"} | {"head_dim"}
