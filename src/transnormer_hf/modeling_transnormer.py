"""TransNormerLLM (TNL) for transformers: SRMSNorm, LRPE, decay rates, SGLU, Lightning Attention, model.

Math and parameter names follow the official OpenNLPLab code (see ../shared/docs/tnl_spec.md, cited as
"spec"), so released checkpoints load without renaming. Deliberate differences from the official code:
- positions come from the cache (`seen_tokens`), never from a counter on the module (spec 10.1, 10.2);
- LRPE angles are computed in fp32, not in the model dtype (spec 9: bf16 rounds positions above 256);
- LRPE's theta is sized from the attention head dim, so hidden_dim != decoder_embed_dim works (spec 10.4);
- one layer is allowed: its decay uses rate = slope * (1 + 1e-5) (the official code divides by L - 1 = 0);
- an unknown activation is an error rather than a silent identity (spec 10.13).
"""

from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation import GenerationMode
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from transnormer_hf.kernels import (
    GEMV_MAX_ROWS,
    STEP_ACTIVATIONS,
    ContextParallelLayout,
    gated_srms_norm,
    gemv,
    lightning_attn,
    lightning_attn_step,
    lightning_attn_step_fused,
    linear_cross_entropy,
    resolve_backend,
    srms_norm,
)

from .cache_transnormer import CACHE_FIELD, TransNormerLLMCache, TransNormerLLMStaticCache
from .configuration_transnormer import TransNormerLLMConfig
from .context_parallel import forward_layout
from .context_parallel import loss_kwargs as context_parallel_loss_kwargs
from .decoding_transnormer import decode_with_cuda_graphs, takes_graph_decoding

# ---- transformers version shim (5.17-5.23: `past_key_values`; 5.24+: `cache`, the name in CACHE_FIELD)
def _merge_cache_kwargs(cache: object, past_key_values: object) -> TransNormerLLMCache | None:
    """Accept the cache under either keyword; anything but our cache is a clear error."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    cache = cache if cache is not None else past_key_values
    if cache is not None and not isinstance(cache, TransNormerLLMCache):
        raise TypeError(
            f"TransNormerLLM keeps a recurrent state, not keys and values: the cache must be a "
            f"TransNormerLLMCache (or None); got {type(cache).__name__}"
        )
    return cache
# ---- end of version shim


def _exp_activation(x: torch.Tensor) -> torch.Tensor:
    # The official "exp" subtracts the (gradient-free) max over the head dim before exponentiating.
    return torch.exp(x - x.amax(dim=-1, keepdim=True).detach())


ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "elu": F.elu,
    "sigmoid": torch.sigmoid,
    "exp": _exp_activation,
    "leak": F.leaky_relu,
    "1+elu": lambda x: 1 + F.elu(x),
    "2+elu": lambda x: 2 + F.elu(x),
    "sine": torch.sin,
    "none": lambda x: x,
}


def _is_plain_linear(module: nn.Module) -> bool:
    """A bias-free nn.Linear that computes only F.linear: not a subclass or wrapper (PEFT, quantisation, FSDP2,
    tensor parallel), no hooks of its own or global ones, no replaced `forward` (accelerate's device-map hooks)."""
    hooks = nn.modules.module
    return (type(module) is nn.Linear and module.bias is None and "forward" not in module.__dict__
            and not (module._forward_hooks or module._forward_pre_hooks)
            and not (hooks._global_forward_hooks or hooks._global_forward_pre_hooks))


def project(x: torch.Tensor, linear: nn.Module, gate: nn.Module | None = None, backend: str = "auto",
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """linear(x), times gate(x) when given (the SGLU gate), plus `residual` when given. A decoding step's few rows
    through plain layers go to `kernels.gemv` (a Triton GEMV on CUDA: both gate products and the residual in one
    pass); everything else calls the modules and adds the residual after them."""
    layers = (linear,) if gate is None else (linear, gate)
    if x.numel() <= GEMV_MAX_ROWS * x.shape[-1] and all(_is_plain_linear(layer) for layer in layers):
        return gemv(x, linear.weight, None if gate is None else gate.weight, residual=residual, backend=backend)
    out = linear(x) if gate is None else linear(x) * gate(x)
    return out if residual is None else residual + out


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi head slopes 2^(-8(h+1)/H); for H not a power of 2, the standard interleaved extension (spec 4)."""

    def power_of_2(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(closest) + power_of_2(2 * closest)[0::2][: num_heads - closest]


def decay_rates(num_heads: int, layer_idx: int, num_layers: int) -> list[float]:
    """Per-head decay rates of one layer: slope_h * (1 - i/(L-1) + 1e-5); lambda = exp(-rate) (spec 4)."""
    depth = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
    return [slope * (1.0 - depth + 1e-5) for slope in alibi_slopes(num_heads)]


def lrpe_initial_theta(num_heads: int, head_dim: int) -> torch.Tensor:
    """theta_{h,j} = 10000^(-2(h*D + j)/(H*D)): one geometric sequence over all heads, (H, 1, D) fp32."""
    width = num_heads * head_dim
    return (10000.0 ** (-2.0 / width * torch.arange(width, dtype=torch.float64))).float().view(num_heads, 1, head_dim)


class TransNormerLLMSRMSNorm(nn.Module):
    """Simple RMSNorm without parameters: x / sqrt(mean(x^2) + eps), statistics in fp32."""

    def __init__(self, eps: float = 1e-6, backend: str = "auto") -> None:
        super().__init__()
        self.eps = eps
        self.backend = backend

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return srms_norm(hidden_states, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def _make_norm(config: TransNormerLLMConfig, width: int) -> nn.Module:
    if config.norm_type == "simplermsnorm":
        return TransNormerLLMSRMSNorm(config.rms_norm_eps, config.attention_backend)
    return nn.LayerNorm(width, eps=1e-5)  # the official fallback for any other norm_type


class TransNormerLLMLrpe(nn.Module):
    """LRPE: x -> [x cos(theta t), x sin(theta t)], so q'_t . k'_s = sum_j q_j k_j cos(theta_j (t - s))."""

    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.theta = nn.Parameter(lrpe_initial_theta(num_heads, head_dim))  # learnable, (H, 1, D)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (B, N, H, D), positions (N,) or per row (B, N), absolute -> (B, N, H, 2D) in x's dtype."""
        theta = self.theta.float().view(self.num_heads, self.head_dim)
        angles = positions.float()[..., None, None] * theta  # (N, H, D) or (B, N, H, D), fp32
        return torch.cat([x * torch.cos(angles).to(x.dtype), x * torch.sin(angles).to(x.dtype)], dim=-1)


class TransNormerLLMMLP(nn.Module):
    """SGLU channel mixer: l3(l1(x) * l2(x)), with no activation (paper eq. 12)."""

    def __init__(self, config: TransNormerLLMConfig) -> None:
        super().__init__()
        width, inner = config.hidden_size, config.intermediate_size
        self.l1 = nn.Linear(width, inner, bias=config.use_bias)
        self.l2 = nn.Linear(width, inner, bias=config.use_bias)
        self.l3 = nn.Linear(inner, width, bias=config.use_bias)
        self.backend = config.attention_backend

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """l3(l1(x) * l2(x)), plus `residual` when given (the decoder layer's skip connection, fused while decoding)."""
        gated = project(hidden_states, self.l1, self.l2, self.backend)
        return project(gated, self.l3, backend=self.backend, residual=residual)


class TransNormerLLMAttention(nn.Module):
    """Token mixer ("NormLinearAttention"): out_proj(u * norm(LightningAttention(phi(q), phi(k), v)))."""

    def __init__(self, config: TransNormerLLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        inner = config.attention_hidden_size
        self.qkvu_proj = nn.Linear(config.hidden_size, 4 * inner, bias=config.use_bias)
        self.out_proj = nn.Linear(inner, config.hidden_size, bias=config.use_bias)
        self.norm = _make_norm(config, inner)  # over the whole inner width, all heads jointly
        self.lrpe = TransNormerLLMLrpe(self.num_heads, self.head_dim) if config.lrpe_layers[layer_idx] else None
        self.act = ACTIVATIONS[config.hidden_act]
        # The fused decode kernel applies these feature maps itself (kernels.STEP_ACTIVATIONS).
        self.step_activation = config.hidden_act if config.hidden_act in STEP_ACTIVATIONS else None
        # Python floats, turned into an fp32 tensor at use: a float buffer would follow the model to bf16,
        # where the last layer's lambda = exp(-slope * 1e-5) rounds to exactly 1.
        self.decay_rates = decay_rates(self.num_heads, layer_idx, config.num_hidden_layers)
        self._decay_rates_by_device: dict[torch.device, torch.Tensor] = {}
        self.backend = config.attention_backend

    def decay_rates_on(self, device: torch.device) -> torch.Tensor:
        """The (H,) fp32 decay rates on `device`, copied there once: a fresh `torch.tensor(..., device="cuda")` in
        every forward would be a blocking host-to-device copy, which waits for all queued GPU work in every layer."""
        if torch.compiler.is_compiling():  # a constant of the compiled graph: no copy at run time
            return torch.tensor(self.decay_rates, dtype=torch.float32, device=device)
        rates = self._decay_rates_by_device.get(device)
        if rates is None:
            with torch.inference_mode(False):  # made under inference mode, autograd could not save it later
                rates = torch.tensor(self.decay_rates, dtype=torch.float32, device=device)
            self._decay_rates_by_device[device] = rates
        return rates

    def forward(
        self,
        hidden_states: torch.Tensor,
        state: torch.Tensor | None,
        positions: torch.Tensor,
        padding_mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        output_final_state: bool,
        state_in_place: bool = False,
        context_parallel: ContextParallelLayout | None = None,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`state_in_place`: a one-token step may write the new state into `state` (the static cache's). `residual`:
        added to the output (the decoder layer's skip connection, in out_proj's pass while decoding)."""
        batch, length, _ = hidden_states.shape
        q, k, v, u = project(hidden_states, self.qkvu_proj, backend=self.backend).chunk(4, dim=-1)
        q, k, v = (x.view(batch, length, self.num_heads, self.head_dim) for x in (q, k, v))  # (B, N, H, D)
        one_position = positions.numel() == 1  # rows of a gathered-mask cache keep their own positions
        if (state is not None and length == 1 and cu_seqlens is None and padding_mask is None and one_position
                and self._fused_step(q)):
            # One kernel for phi(q), phi(k), LRPE and the step: ~20 small kernels fewer per layer and token.
            lrpe = self.lrpe is not None
            step_v = v.float() if v.dtype == torch.float16 else v  # fp16: an fp32 output, see below
            out, new_state = lightning_attn_step_fused(
                q, k, step_v, self.decay_rates_on(q.device), state, activation=self.step_activation,
                theta=self.lrpe.theta if lrpe else None, position=positions if lrpe else None,
                out_state=state if state_in_place else None, backend="triton",
            )
            return self._output(out.reshape(batch, length, -1), u, residual), new_state  # (B, 1, H * D)
        q, k = self.act(q), self.act(k)
        if self.lrpe is not None:
            q, k = self.lrpe(q, positions), self.lrpe(k, positions)  # (B, N, H, 2D)
        if padding_mask is not None:
            # The only use of the padding mask (spec 5): padded tokens add nothing to the state, which makes
            # left padding exact because decay and LRPE are relative.
            v = v * padding_mask[:, :, None, None].to(v.dtype)
        rates = self.decay_rates_on(q.device)
        # fp16: the output has no softmax denominator and grows with position (about 2e5 at 2K tokens in a trained
        # model's last layers, where lambda ~ 1), past fp16's 65504. The norm after it is scale-invariant, so the
        # output stays fp32 until it is normalised, and only the normalised values meet fp16 (bf16 has fp32's range).
        fp32_output = v.dtype == torch.float16
        if state is not None and length == 1 and cu_seqlens is None:
            # the step returns v's dtype: an fp32 v (one token) gives an fp32 output
            out, new_state = lightning_attn_step(q, k, v.float() if fp32_output else v, rates, state,
                                                 backend=self.backend)
        else:
            out, new_state = lightning_attn(
                q, k, v, rates, initial_state=state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, output_dtype=torch.float32 if fp32_output else None, backend=self.backend,
                context_parallel=context_parallel,
            )
        return self._output(out.reshape(batch, length, -1), u, residual), new_state  # (B, N, H * D)

    def _fused_step(self, q: torch.Tensor) -> bool:
        """Whether a one-token step takes the fused Triton decode kernel (Triton backend, a feature map it has)."""
        return self.step_activation is not None and resolve_backend(self.backend, q.device, "triton_decode") == "triton"

    def _output(self, out: torch.Tensor, u: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """out_proj(u * norm(out)) (+ residual) for out, u (B, N, H * D); an fp32 `out` of an fp16 model is normalised
        in fp32."""
        if out.dtype != u.dtype:
            gated = u * self._norm_fp32(out).to(u.dtype)
        elif isinstance(self.norm, TransNormerLLMSRMSNorm):  # u * norm(out) in one fused pass on Triton
            gated = gated_srms_norm(out, u, self.norm.eps, backend=self.norm.backend)
        else:
            gated = u * self.norm(out)
        return project(gated, self.out_proj, backend=self.backend, residual=residual)

    def _norm_fp32(self, out: torch.Tensor) -> torch.Tensor:
        """The output norm of an fp32 `out`, in fp32 (a LayerNorm's fp16 parameters are upcast for it)."""
        if isinstance(self.norm, TransNormerLLMSRMSNorm):
            return self.norm(out)
        weight, bias = (p.float() if p is not None else None for p in (self.norm.weight, self.norm.bias))
        return F.layer_norm(out, self.norm.normalized_shape, weight, bias, self.norm.eps)


class TransNormerLLMDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + TokenMixer(norm(x)), then x + SGLU(norm(x))."""

    def __init__(self, config: TransNormerLLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.token_norm = _make_norm(config, config.hidden_size)
        self.token_mixer = TransNormerLLMAttention(config, layer_idx)
        self.channel_norm = _make_norm(config, config.hidden_size)
        self.channel_mixer = TransNormerLLMMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        state: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        output_final_state: bool = False,
        state_in_place: bool = False,
        context_parallel: ContextParallelLayout | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The mixers add the skip connections themselves: while decoding, in the GEMVs of out_proj and l3.
        hidden_states, new_state = self.token_mixer(
            self.token_norm(hidden_states), state, positions, padding_mask, cu_seqlens, output_final_state,
            state_in_place, context_parallel, residual=hidden_states,
        )
        hidden_states = self.channel_mixer(self.channel_norm(hidden_states), residual=hidden_states)
        return hidden_states, new_state


class TransNormerLLMPreTrainedModel(PreTrainedModel):
    config: TransNormerLLMConfig
    config_class = TransNormerLLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransNormerLLMDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: the model creates its own recurrent cache.
        return False

    def _init_weights(self, module: nn.Module) -> None:
        # Linear and Embedding (pad row zeroed) as the official init; LRPE theta back to its geometric start.
        super()._init_weights(module)
        if isinstance(module, TransNormerLLMLrpe):
            from transformers import initialization as init

            init.copy_(module.theta, lrpe_initial_theta(module.num_heads, module.head_dim))


def _broadcast_position_ids(position_ids: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """position_ids as (B, N); a (N,) or (1, N) tensor holds for every row, as in Llama."""
    if position_ids is None:
        return None
    shape = tuple(position_ids.shape)
    position_ids = position_ids if position_ids.dim() != 1 else position_ids[None]
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != length:
        raise ValueError(
            f"position_ids must have shape (batch, length) = ({batch}, {length}), or (1, {length}) for all rows; "
            f"got {shape}"
        )
    return position_ids.expand(batch, length)


def _packed_boundaries(position_ids: torch.Tensor, with_cache: bool) -> torch.Tensor | None:
    """cu_seqlens of the flattened batch when position_ids (B, N) restart inside a row (packed documents), else None.

    Eagerly the boundaries are read on the host (one sync), and a batch without restarts stays unpacked. A compiled
    graph cannot branch on data or make data-sized tensors, so there the batch always runs packed with B * N + 1
    boundaries: the documents', then the total repeated (empty documents, which the kernels skip)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    restarts = starts[:, 1:].any()
    if with_cache:  # packing holds several documents per row, but a cache one state per row
        if torch.compiler.is_compiling():
            torch._assert_async(~restarts, _PACKED_WITH_CACHE)
        elif bool(restarts):
            raise ValueError(_PACKED_WITH_CACHE)
        return None
    starts = starts.flatten()
    total = starts.numel()
    if torch.compiler.is_compiling():
        index = torch.arange(total, device=starts.device)
        slot = torch.where(starts, starts.cumsum(0) - 1, total)  # the k-th start goes to entry k; others to the end
        bounds = torch.full((total + 1,), total, dtype=torch.int64, device=starts.device)
        return bounds.scatter(0, slot, torch.where(starts, index, total))
    if not bool(restarts):
        return None
    total_tensor = torch.full((1,), total, device=starts.device)  # no host-to-device copy
    return torch.cat([starts.nonzero().flatten(), total_tensor]).to(torch.int64)


_PACKED_WITH_CACHE = (
    "packed sequences (position_ids that restart inside a row, or cu_seq_lens_q) hold several documents per row, "
    "so they cannot be combined with a cache; pass use_cache=False"
)
_SUPPORTED_MASKS = (
    "without a cache, the real tokens of each row must be one run (left or right padding); on a cache or a state, "
    "any mask is exact in eager mode, but a compiled forward takes only left padding on an empty cache"
)


def _plan_padding(padding_mask: torch.Tensor, has_state: bool, wants_state: bool) -> tuple[torch.Tensor | None, bool]:
    """(the mask the layers apply, whether the rows must be gathered) for a (B, N) mask of this forward's tokens.

    The layers only zero the values of masked tokens (spec 5), yet a masked token still decays the state and takes
    an LRPE position. That is exact where no real token comes after masked ones with a state before them: left
    padding on an empty state, and right padding when no final state is kept. Any other mask (the new turns of a
    batched chat, padded between the cached context and their tokens) gathers the real tokens of each row into one
    packed sequence that starts from the row's state (`_gather_rows`). One host sync decides, eagerly; a compiled
    graph cannot branch on data, so it asserts on the device that the mask is of the first kind."""
    real = padding_mask.bool()
    runs = real[:, 0].long() + (real[:, 1:] & ~real[:, :-1]).sum(dim=1)  # runs of real tokens per row
    ends_real = real[:, -1] | (runs == 0)
    if has_state:
        dense = real.all()
    else:
        dense = ((runs <= 1) & (ends_real if wants_state else True)).all()
    if torch.compiler.is_compiling():
        torch._assert_async(dense, f"this attention_mask cannot run in a compiled forward: {_SUPPORTED_MASKS}")
        return padding_mask, False
    all_real, dense = torch.stack([real.all(), dense]).tolist()
    if all_real:
        return None, False
    return (padding_mask, False) if dense else (None, True)


class _GatheredRows:
    """The real tokens of a (B, N) batch laid end to end, one packed sequence per row, so that masked tokens
    neither decay a row's state nor take an LRPE position; `scatter` puts results back (zeros at masked tokens)."""

    def __init__(self, padding_mask: torch.Tensor, first_positions: torch.Tensor) -> None:
        """padding_mask (B, N); first_positions (B, 1) or (1, 1): the LRPE position of each row's next real token."""
        real = padding_mask.bool()
        self.batch, self.length = real.shape
        self.real_tokens = real.sum(dim=1)  # (B,)
        self.index = real.flatten().nonzero().flatten()  # (T,) flat index of each real token
        self.cu_seqlens = F.pad(self.real_tokens.cumsum(0), (1, 0))  # (B + 1,): row r is a sequence of its own
        self.positions = (first_positions + real.cumsum(dim=1) - 1).flatten()[self.index]  # (T,)

    def gather(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, N, d) -> (1, T, d)"""
        return hidden_states.reshape(self.batch * self.length, -1)[self.index][None]

    def scatter(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(1, T, d) -> (B, N, d), zeros at masked tokens"""
        full = hidden_states.new_zeros(self.batch * self.length, hidden_states.shape[-1])
        return full.index_copy(0, self.index, hidden_states[0]).view(self.batch, self.length, -1)


class TransNormerLLMModel(TransNormerLLMPreTrainedModel):
    """The decoder stack: scaled embeddings, L decoder layers, final norm."""

    def __init__(self, config: TransNormerLLMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(TransNormerLLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = _make_norm(config, config.hidden_size)
        self.embed_scale = math.sqrt(config.hidden_size) if config.scale_embedding else 1.0
        self.gradient_checkpointing = False
        self.context_parallel_group = None  # a process group: each forward is one slice (context_parallel.py)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: TransNormerLLMCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: TransNormerLLMCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """Run the decoder. `attention_mask` (B, N_total) is 1 on real tokens: masked tokens take no part in the
        state and no LRPE position, so each row equals that row alone (for a one-token step the token is taken as
        real, as generate() always makes it); see `_plan_padding` for the masks a compiled forward takes.

        `position_ids` ((B, N), or (1, N) for all rows) are only read to find packed documents (positions that
        restart inside a row, the `DataCollatorWithFlattening` convention): the state then resets at each document
        boundary; `cu_seq_lens_q` gives the boundaries directly. LRPE positions come from the cache's seen-token
        count, like the official code's.
        """
        cache = _merge_cache_kwargs(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("specify exactly one of input_ids or inputs_embeds")
        if cache is not None and len(cache.layers) != len(self.layers):
            raise ValueError(
                f"the cache holds {len(cache.layers)} layer states but the model has {len(self.layers)} layers; "
                f"build it with TransNormerLLMCache(model.config)"
            )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and self.context_parallel_group is None
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False
        if use_cache and cache is None:
            cache = TransNormerLLMCache(self.config)
        if not use_cache:
            cache = None

        batch, length = inputs_embeds.shape[:2]
        position_ids = _broadcast_position_ids(position_ids, batch, length)
        padding_mask, rows = None, None
        if isinstance(attention_mask, dict):  # compileable-cache generate() passes masks keyed by layer type
            attention_mask = attention_mask.get("linear_attention")
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
                raise ValueError(
                    f"attention_mask must be 2-D (batch, past + current length) with batch {batch} and at least "
                    f"{length} columns; got {tuple(attention_mask.shape)}"
                )
            if length > 1:
                has_state = cache is not None and cache.layers[0].state is not None
                padding_mask, gather = _plan_padding(attention_mask[:, -length:], has_state, cache is not None)
                if gather:
                    first = cache.positions(1, inputs_embeds.device) if cache is not None else torch.zeros(1)
                    rows = _GatheredRows(attention_mask[:, -length:], first.view(-1, 1).to(inputs_embeds.device))

        cu_seqlens = kwargs.get("cu_seq_lens_q")
        if cu_seqlens is not None and (cache is not None or rows is not None):
            raise ValueError(_PACKED_WITH_CACHE if cache is not None else
                             "cu_seq_lens_q packs documents without padding; pass no attention_mask with it")
        if cu_seqlens is None and length > 1 and padding_mask is None and rows is None and position_ids is not None:
            cu_seqlens = _packed_boundaries(position_ids, with_cache=cache is not None)
        hidden_states = inputs_embeds * self.embed_scale
        if rows is not None:
            hidden_states = rows.gather(hidden_states)  # (1, T, d): each row's real tokens, rows end to end
            cu_seqlens, positions = rows.cu_seqlens, rows.positions
        elif cu_seqlens is not None:
            hidden_states = hidden_states.reshape(1, batch * length, -1)  # (1, B * N, d): rows end-to-end
            cu_seqlens = cu_seqlens.to(device=hidden_states.device, dtype=torch.int64)
            positions = torch.arange(hidden_states.shape[1], device=hidden_states.device)
        elif cache is not None:
            positions = cache.positions(length, hidden_states.device)
        else:
            positions = torch.arange(length, device=hidden_states.device)

        context_parallel = None
        if self.context_parallel_group is not None:
            context_parallel = forward_layout(
                self.context_parallel_group, position_ids, hidden_states, cu_seqlens, cache
            )
            positions = positions + context_parallel.offset  # LRPE: global positions

        def unpack(states: torch.Tensor) -> torch.Tensor:
            return rows.scatter(states) if rows is not None else states.view(batch, length, -1)

        all_hidden_states = () if output_hidden_states else None
        for layer_idx, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (unpack(hidden_states),)
            state = cache.layers[layer_idx].state if cache is not None else None
            hidden_states, new_state = layer(
                hidden_states, state=state, positions=positions, padding_mask=padding_mask,
                cu_seqlens=cu_seqlens, output_final_state=cache is not None, context_parallel=context_parallel,
                state_in_place=cache is not None and cache.layers[layer_idx].is_compileable,
            )
            if cache is not None:
                cache.layers[layer_idx].update(new_state)
        hidden_states = unpack(self.final_norm(hidden_states))
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if cache is not None:
            # Advanced once, after every layer, by this forward's length: every layer saw the same positions.
            cache.advance(length, rows.real_tokens if rows is not None else None)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, **{CACHE_FIELD: cache}
        )
        return output if return_dict else output.to_tuple()


class TransNormerLLMForCausalLM(TransNormerLLMPreTrainedModel, GenerationMixin):
    """TNL with a tied language-model head; `generate()` keeps one fixed-size state per layer."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # Under tp_plan="auto" transformers shards the (tied) embedding by vocabulary; the head then computes its
    # vocabulary slice of the logits and gathers them (as Llama does).
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _can_compile_fullgraph = True  # the decode step traces as one graph (tests/test_static_decode.py)

    def __init__(self, config: TransNormerLLMConfig) -> None:
        super().__init__(config)
        self.model = TransNormerLLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: TransNormerLLMCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: TransNormerLLMCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits (of the last `logits_to_keep` positions when non-zero) and, with `labels`, the shifted
        causal-LM loss (ignore index -100; honours `num_items_in_batch` under gradient accumulation).

        With `config.loss_chunk_size > 0` a training step computes the loss chunk by chunk from the hidden states and
        returns `logits=None` (turn it off for tools that read training logits, e.g. token accuracy)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if labels is not None and self.model.context_parallel_group is not None:
            kwargs = context_parallel_loss_kwargs(self.model.context_parallel_group, labels, kwargs)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=_merge_cache_kwargs(cache, past_key_values), inputs_embeds=inputs_embeds,
            use_cache=use_cache, output_hidden_states=output_hidden_states, return_dict=True, **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        logits = loss = None
        if labels is not None and self._uses_chunked_loss(logits_to_keep):
            loss = self._chunked_loss(hidden_states, labels, **kwargs)
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = project(hidden_states[:, keep], self.lm_head, backend=self.config.attention_backend)
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
        return output if return_dict else output.to_tuple()

    def _uses_chunked_loss(self, logits_to_keep: int | torch.Tensor) -> bool:
        """The chunked loss stands in for the head only where it computes the same thing: in training, on every
        position, with a plain bias-free nn.Linear head (not wrapped by PEFT, quantised or hooked, e.g. by TP)."""
        head = self.lm_head
        plain_head = type(head) is nn.Linear and head.bias is None
        hooked = bool(head._forward_hooks or head._forward_pre_hooks)
        all_positions = isinstance(logits_to_keep, int) and logits_to_keep == 0
        enabled = self.config.loss_chunk_size > 0 and torch.is_grad_enabled()
        return enabled and all_positions and plain_head and not hooked

    def _chunked_loss(self, hidden_states: torch.Tensor, labels: torch.LongTensor,
                      shift_labels: torch.Tensor | None = None,
                      num_items_in_batch: int | torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """transformers' ForCausalLMLoss on `lm_head(hidden_states)`, without building the logits."""
        if shift_labels is None:  # tokens < n predict n: pad on the right with the ignore index, drop the first
            shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        return linear_cross_entropy(
            hidden_states.reshape(-1, hidden_states.shape[-1]), self.lm_head.weight,  # (B * N, D)
            shift_labels.reshape(-1).to(hidden_states.device), chunk_size=self.config.loss_chunk_size,
            num_items_in_batch=num_items_in_batch, backend=self.config.attention_backend,
        )

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, streamer=None, **kwargs):
        """transformers' `generate()`. On CUDA, greedy decoding and sampling run their steps from a CUDA graph with the
        stop check off the critical path (`decode_with_cuda_graphs`: the same tokens, several times faster); set
        `config.cuda_graph_decoding = False`, or pass a `custom_generate`, for transformers' own loop."""
        if kwargs.get("custom_generate") is None and self._decodes_with_cuda_graphs(generation_config, kwargs):
            # transformers hands a custom loop none of its own arguments (streamer, synced_gpus): they are bound here
            kwargs["custom_generate"] = functools.partial(decode_with_cuda_graphs, streamer=streamer, synced_gpus=False)
        return super().generate(inputs, generation_config, streamer=streamer, **kwargs)

    def _decodes_with_cuda_graphs(self, generation_config, kwargs: dict) -> bool:
        """Whether this generate() call is greedy or multinomial sampling on one CUDA device with graph decoding on.

        Not with stop strings or token healing, which need the `tokenizer` that transformers does not hand on to a
        custom loop; nor across processes, whose generate may need synced steps or collectives."""
        if not self.config.cuda_graph_decoding or not takes_graph_decoding(self.device):
            return False
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            return False
        merged = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        merged.update(**kwargs)  # generate()'s keyword overrides; the rest it returns, and we ignore
        if merged.stop_strings is not None or merged.token_healing:
            return False
        mode = merged.get_generation_mode(kwargs.get("assistant_model"))
        return mode in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        """generate() gets our recurrent cache up front, so that every path that needs one (chunked prefill) has it:
        `cache_implementation` None or "dynamic" gives a `TransNormerLLMCache`, "static" a `TransNormerLLMStaticCache`
        (generate then compiles the decode step: on CUDA by default, elsewhere with a `compile_config`); any other
        kind (quantized, offloaded, sliding-window...) stores keys and values, which this model has none of."""
        user_cache = model_kwargs.get(CACHE_FIELD) is not None
        if user_cache or generation_config.use_cache is False:  # transformers checks the conflicts there
            super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
            return
        implementation = generation_config.cache_implementation
        if implementation not in (None, "dynamic", "static"):
            raise ValueError(
                f"cache_implementation={implementation!r} is not supported by TransNormerLLM, whose cache is one "
                f"fixed-size recurrent state per layer (no keys and values to quantise or offload); use None, "
                f"'dynamic' (both give a TransNormerLLMCache) or 'static' (a TransNormerLLMStaticCache)"
            )
        cache_class = TransNormerLLMStaticCache if implementation == "static" else TransNormerLLMCache
        model_kwargs[CACHE_FIELD] = cache_class(self.config)
