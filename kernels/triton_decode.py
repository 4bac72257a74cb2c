"""One Lightning Attention decoding step for a batch, in Triton: S' = exp(-rate) S + k^T v; o = scale q S'.

The math is `lightning_attn_recurrent_ref` with N == 1 (reference.py). The step is bound by the state's
traffic: each fp32 state element is read once and written once, and q, k, v, o are tiny. One program
owns a (d_k, BLOCK_V) column strip of one (batch, head) state and walks down d_k in BLOCK_K slices,
updating and storing each slice and accumulating q . S' for its BLOCK_V outputs in fp32.

Out of place: the new state goes to a fresh tensor and the input state is left untouched. Writing in place
would move the same bytes (read S, write S), so it saves nothing but an allocation from the caching
allocator, while out of place keeps the op functional (no aliasing surprises for a caller who kept the old
state, e.g. to branch two continuations; safe to autotune; nothing special for torch.compile).

`_lightning_attn_step_fused_kernel` is the same step on the raw q, k projections: it applies the feature map and
the LRPE rotation itself (`lightning_attn_step_fused_ref`), which replaces about 20 small kernels per layer and
token of the unfused model path, and it may write the new state in place (the static cache's eager steps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_device import on_device

Tensor = torch.Tensor

# Value-slice widths and warps tried by both decode kernels (one program per (batch, head, value slice)).
_STEP_CONFIGS = [
    triton.Config({"BLOCK_V": 32}, num_warps=2),
    triton.Config({"BLOCK_V": 32}, num_warps=4),
    triton.Config({"BLOCK_V": 64}, num_warps=4),
    triton.Config({"BLOCK_V": 16}, num_warps=2),
]


@triton.autotune(
    configs=_STEP_CONFIGS,
    key=["KEY_DIM", "VALUE_DIM", "batch_heads"],
)
@triton.jit
def _lightning_attn_step_kernel(
    Q, K, V, DECAY_RATES, STATE, NEW_STATE, O,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ob, stride_oh,
    heads, batch_heads, scale,
    KEY_DIM: tl.constexpr,
    VALUE_DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """NEW_STATE[b, h, :, v-strip] = lambda_h STATE + k^T v;  O[b, h, v-strip] = scale q NEW_STATE."""
    i_bh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_b = i_bh // heads
    i_h = i_bh % heads
    decay = tl.exp(-tl.load(DECAY_RATES + i_h).to(tl.float32))
    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_v = o_v < VALUE_DIM
    b_v = tl.load(V + i_b * stride_vb + i_h * stride_vh + o_v, mask=m_v, other=0.0).to(tl.float32)
    o_state = tl.cast(i_bh, tl.int64) * (KEY_DIM * VALUE_DIM)
    b_o = tl.zeros([BLOCK_V], dtype=tl.float32)
    for i_k in tl.static_range(0, KEY_DIM, BLOCK_K):
        o_k = i_k + tl.arange(0, BLOCK_K)
        m_k = o_k < KEY_DIM
        b_q = tl.load(Q + i_b * stride_qb + i_h * stride_qh + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(K + i_b * stride_kb + i_h * stride_kh + o_k, mask=m_k, other=0.0).to(tl.float32)
        o_s = o_state + o_k[:, None] * VALUE_DIM + o_v[None, :]
        m_s = m_k[:, None] & m_v[None, :]
        b_s = decay * tl.load(STATE + o_s, mask=m_s, other=0.0) + b_k[:, None] * b_v[None, :]
        tl.store(NEW_STATE + o_s, b_s, mask=m_s)
        b_o += tl.sum(b_q[:, None] * b_s, axis=0)
    tl.store(O + i_b * stride_ob + i_h * stride_oh + o_v, (scale * b_o).to(O.dtype.element_ty), mask=m_v)



@triton.jit
def _step_activation(x, ACTIVATION: tl.constexpr):
    """phi(x) in fp32 for the names of reference.STEP_ACTIVATIONS."""
    if ACTIVATION == "silu" or ACTIVATION == "swish":
        y = x * tl.sigmoid(x)
    elif ACTIVATION == "relu":
        y = tl.maximum(x, 0.0)
    elif ACTIVATION == "sigmoid":
        y = tl.sigmoid(x)
    else:
        y = x
    return y


@triton.autotune(
    configs=_STEP_CONFIGS,
    key=["KEY_DIM", "VALUE_DIM", "batch_heads"],
    restore_value=["NEW_STATE"],  # NEW_STATE may be STATE (in place): timing a config must not advance it
)
@triton.jit
def _lightning_attn_step_fused_kernel(
    Q, K, V, DECAY_RATES, THETA, POSITION, STATE, NEW_STATE, O,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ob, stride_oh,
    heads, batch_heads, scale,
    HEAD_DIM: tl.constexpr,
    KEY_DIM: tl.constexpr,
    VALUE_DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_LRPE: tl.constexpr,
):
    """`_lightning_attn_step_kernel` on raw q, k: phi, then (HAS_LRPE) x'_j = phi(x)_{j mod D} * (cos | sin)(theta t)
    for j < D | j >= D (KEY_DIM = 2 D), all in fp32 and recomputed by each v-strip program (D values: free)."""
    i_bh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_b = i_bh // heads
    i_h = i_bh % heads
    decay = tl.exp(-tl.load(DECAY_RATES + i_h).to(tl.float32))
    if HAS_LRPE:
        position = tl.load(POSITION).to(tl.float32)
    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_v = o_v < VALUE_DIM
    b_v = tl.load(V + i_b * stride_vb + i_h * stride_vh + o_v, mask=m_v, other=0.0).to(tl.float32)
    o_state = tl.cast(i_bh, tl.int64) * (KEY_DIM * VALUE_DIM)
    b_o = tl.zeros([BLOCK_V], dtype=tl.float32)
    for i_k in tl.static_range(0, KEY_DIM, BLOCK_K):
        o_k = i_k + tl.arange(0, BLOCK_K)
        m_k = o_k < KEY_DIM
        if HAS_LRPE:
            o_x = tl.where(o_k < HEAD_DIM, o_k, o_k - HEAD_DIM)  # the feature j mod D
        else:
            o_x = o_k
        b_q = tl.load(Q + i_b * stride_qb + i_h * stride_qh + o_x, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(K + i_b * stride_kb + i_h * stride_kh + o_x, mask=m_k, other=0.0).to(tl.float32)
        b_q = tl.where(m_k, _step_activation(b_q, ACTIVATION), 0.0)  # phi(0) need not be 0 (sigmoid)
        b_k = tl.where(m_k, _step_activation(b_k, ACTIVATION), 0.0)
        if HAS_LRPE:
            b_angle = position * tl.load(THETA + i_h * HEAD_DIM + o_x, mask=m_k, other=0.0).to(tl.float32)
            b_rotation = tl.where(o_k < HEAD_DIM, tl.cos(b_angle), tl.sin(b_angle))
            b_q *= b_rotation
            b_k *= b_rotation
        o_s = o_state + o_k[:, None] * VALUE_DIM + o_v[None, :]
        m_s = m_k[:, None] & m_v[None, :]
        b_s = decay * tl.load(STATE + o_s, mask=m_s, other=0.0) + b_k[:, None] * b_v[None, :]
        tl.store(NEW_STATE + o_s, b_s, mask=m_s)
        b_o += tl.sum(b_q[:, None] * b_s, axis=0)
    tl.store(O + i_b * stride_ob + i_h * stride_oh + o_v, (scale * b_o).to(O.dtype.element_ty), mask=m_v)

def _heads_rows(x: Tensor) -> Tensor:
    """(B, 1, H, D) -> (B, H, D) with unit stride along D (a view whenever strides allow)."""
    x = x[:, 0]
    return x if x.stride(-1) == 1 else x.contiguous()


def _lightning_attn_step(
    q: Tensor, k: Tensor, v: Tensor, decay_rates: Tensor, state: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Launcher: (o (B, 1, H, d_v) in v's dtype, new fp32 state (B, H, d_k, d_v))."""
    batch, _, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    q_rows, k_rows, v_rows = _heads_rows(q), _heads_rows(k), _heads_rows(v)  # (B, H, D)
    state = state.contiguous()
    new_state = torch.empty_like(state)
    out = torch.empty(batch, 1, heads, value_dim, dtype=v.dtype, device=v.device)
    out_rows = out[:, 0]  # (B, H, d_v)
    if batch > 0:
        grid = lambda meta: (batch * heads, triton.cdiv(value_dim, meta["BLOCK_V"]))  # noqa: E731
        with on_device(q):
            _lightning_attn_step_kernel[grid](
                q_rows, k_rows, v_rows, decay_rates.contiguous(), state, new_state, out_rows,
                q_rows.stride(0), q_rows.stride(1), k_rows.stride(0), k_rows.stride(1),
                v_rows.stride(0), v_rows.stride(1), out_rows.stride(0), out_rows.stride(1),
                heads, batch * heads, scale,
                KEY_DIM=key_dim, VALUE_DIM=value_dim, BLOCK_K=min(64, triton.next_power_of_2(key_dim)),
            )
    return out, new_state


# A plain operator (define/impl, cheaper per call than custom_op) with a fake implementation, so
# torch.compile traces it; decoding needs no autograd.
torch.library.define(
    "transnormer_hf::lightning_attn_step",
    "(Tensor q, Tensor k, Tensor v, Tensor decay_rates, Tensor state, float scale) -> (Tensor, Tensor)",
)
torch.library.impl("transnormer_hf::lightning_attn_step", "default", _lightning_attn_step)


@torch.library.register_fake("transnormer_hf::lightning_attn_step")
def _(q: Tensor, k: Tensor, v: Tensor, decay_rates: Tensor, state: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    batch, _, heads, _ = q.shape
    out = v.new_empty(batch, 1, heads, v.shape[-1])
    return out, torch.empty_like(state, memory_format=torch.contiguous_format)


_lightning_attn_step_op = torch.ops.transnormer_hf.lightning_attn_step.default


def lightning_attn_step(
    q: Tensor, k: Tensor, v: Tensor, decay_rates: Tensor, state: Tensor, *, scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """One decoding step (see module docstring); shapes are checked by the caller, the state must be fp32.

    q, k: (B, 1, H, d_k); v: (B, 1, H, d_v); decay_rates: (H,) float; state: (B, H, d_k, d_v) fp32.
    Returns (o (B, 1, H, d_v) in v's dtype, new state (B, H, d_k, d_v) fp32); `state` is not modified.
    """
    if state.dtype != torch.float32:
        raise ValueError(f"state must be float32 for the Triton decode step; got {state.dtype}")
    return _lightning_attn_step_op(q, k, v, decay_rates, state, float(scale))



def _lightning_attn_step_fused(
    q: Tensor, k: Tensor, v: Tensor, decay_rates: Tensor, state: Tensor, theta: Tensor | None,
    position: Tensor | None, activation: str, scale: float, out_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Launcher: (o (B, 1, H, d_v) in v's dtype, new fp32 state (B, H, d_k, d_v), written to `out_state` when given,
    which may be `state` itself: each program reads its strip of the state before it writes it)."""
    batch, _, heads, head_dim = q.shape
    key_dim, value_dim = state.shape[-2], v.shape[-1]
    q_rows, k_rows, v_rows = _heads_rows(q), _heads_rows(k), _heads_rows(v)  # (B, H, D)
    state = state.contiguous()
    new_state = torch.empty_like(state) if out_state is None else out_state
    out = torch.empty(batch, 1, heads, value_dim, dtype=v.dtype, device=v.device)
    out_rows = out[:, 0]  # (B, H, d_v)
    lrpe = theta is not None
    theta_rows = theta.reshape(heads, head_dim).contiguous() if lrpe else decay_rates  # (H, D); unread without LRPE
    if batch > 0:
        grid = lambda meta: (batch * heads, triton.cdiv(value_dim, meta["BLOCK_V"]))  # noqa: E731
        with on_device(q):
            _lightning_attn_step_fused_kernel[grid](
                q_rows, k_rows, v_rows, decay_rates.contiguous(), theta_rows, position if lrpe else decay_rates,
                state, new_state, out_rows,
                q_rows.stride(0), q_rows.stride(1), k_rows.stride(0), k_rows.stride(1),
                v_rows.stride(0), v_rows.stride(1), out_rows.stride(0), out_rows.stride(1),
                heads, batch * heads, scale,
                HEAD_DIM=head_dim, KEY_DIM=key_dim, VALUE_DIM=value_dim,
                BLOCK_K=min(64, triton.next_power_of_2(key_dim)), ACTIVATION=activation, HAS_LRPE=lrpe,
            )
    return out, new_state


# Functional (a fresh state), so tracing needs no mutation; eager callers may pass `out_state` to the launcher.
torch.library.define(
    "transnormer_hf::lightning_attn_step_fused",
    "(Tensor q, Tensor k, Tensor v, Tensor decay_rates, Tensor state, Tensor? theta, Tensor? position, "
    "str activation, float scale) -> (Tensor, Tensor)",
)
torch.library.impl("transnormer_hf::lightning_attn_step_fused", "default", _lightning_attn_step_fused)


@torch.library.register_fake("transnormer_hf::lightning_attn_step_fused")
def _(q: Tensor, k: Tensor, v: Tensor, decay_rates: Tensor, state: Tensor, theta: Tensor | None,
      position: Tensor | None, activation: str, scale: float) -> tuple[Tensor, Tensor]:
    batch, _, heads, _ = q.shape
    return v.new_empty(batch, 1, heads, v.shape[-1]), torch.empty_like(state, memory_format=torch.contiguous_format)


lightning_attn_step_fused_op = torch.ops.transnormer_hf.lightning_attn_step_fused.default
