"""Readable torch references for Lightning Attention and SRMSNorm (no Triton).

Lightning Attention is causal linear attention with a per-head exponential decay. For one head,
with decay lambda = exp(-rate) and an optional initial state S_0 (d_k x d_v):

    S_t = lambda * S_{t-1} + k_t^T v_t          o_t = scale * q_t S_t

so o_t = scale * (sum_{s<=t} (q_t . k_s) lambda^(t-s) v_s + lambda^(t+1) q_t S_0). There is no softmax
and no normaliser (TNL normalises the output with SRMSNorm afterwards).

Three forms compute it, each with the public op's signature and return value `(o, final_state)`:
- `lightning_attn_parallel_ref`: the masked quadratic definition. O(N^2) memory; the float64 truth.
- `lightning_attn_recurrent_ref`: the token loop above, which is exactly one decoding step per token.
- `lightning_attn_chunk_ref`: the blocking the Triton kernel uses (intra-block masked matmul,
  inter-block through the running state). O(N * block) memory: the CPU path of the model.

Layout follows fla: q, k (B, N, H, d_k), v (B, N, H, d_v); decay rates (H,) fp32 and >= 0; states
(B, H, d_k, d_v) in fp32 (float64 when the inputs are float64). Every decay factor used is
exp(-rate * distance) with distance >= 0, so nothing can overflow for any rate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def validate_lightning_attn_args(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay_rates: Tensor,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
) -> None:
    """Raise a ValueError naming the argument when shapes or dtypes do not fit (metadata only, no sync)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k and v must be 4-D (B, N, H, D); got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape; got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must match q in (B, N, H); got v {tuple(v.shape)} and q {tuple(q.shape)}")
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        raise ValueError(f"q, k and v must be floating point; got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, _, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    if decay_rates.shape != (heads,) or not decay_rates.is_floating_point():
        raise ValueError(
            f"decay_rates must be a float tensor of shape (H,) = ({heads},); got {tuple(decay_rates.shape)} {decay_rates.dtype}"
        )
    num_states = batch
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(
                f"cu_seqlens must be a 1-D integer tensor [0, ..., N] with at least 2 entries; got {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}"
            )
        if batch != 1:
            raise ValueError(f"with cu_seqlens the packed batch must have B == 1; got B = {batch}")
        num_states = cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (num_states, heads, key_dim, value_dim):
        raise ValueError(
            f"initial_state must have shape ({num_states}, {heads}, {key_dim}, {value_dim}) (sequences, H, d_k, d_v); "
            f"got {tuple(initial_state.shape)}"
        )


def _state_dtype(x: Tensor) -> torch.dtype:
    # States and decay factors are fp32 whatever the input dtype; float64 stays float64 (test truth).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sequence(
    form: Callable[..., tuple[Tensor, Tensor | None]],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay_rates: Tensor,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: Tensor,
    output_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Run `form` on each packed sequence of a (1, total, H, D) batch, resetting the state at each boundary."""
    bounds = cu_seqlens.tolist()
    outputs, final_states = [], []
    for index, (begin, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        state = None if initial_state is None else initial_state[index : index + 1]
        out, final = form(
            q[:, begin:end], k[:, begin:end], v[:, begin:end], decay_rates,
            scale=scale, initial_state=state, output_final_state=True, output_dtype=output_dtype,
        )
        outputs.append(out)
        final_states.append(final)
    final_state = torch.cat(final_states, dim=0) if output_final_state else None
    return torch.cat(outputs, dim=1), final_state


def _heads_first(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.transpose(1, 2).to(dtype)  # (B, N, H, D) -> (B, H, N, D)


def lightning_attn_parallel_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay_rates: Tensor,
    *,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    output_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The quadratic definition with an explicit N x N decay mask; the float64 truth for tests."""
    if cu_seqlens is not None:
        return _per_sequence(lightning_attn_parallel_ref, q, k, v, decay_rates, scale,
                             initial_state, output_final_state, cu_seqlens, output_dtype)
    dtype = _state_dtype(q)
    length = q.shape[1]
    qh, kh, vh = (_heads_first(x, dtype) for x in (q, k, v))  # (B, H, N, D)
    rates = decay_rates.to(dtype).view(-1, 1, 1)  # (H, 1, 1)
    position = torch.arange(length, device=q.device, dtype=dtype)
    distance = position[:, None] - position[None, :]  # t - s, (N, N)
    decay = torch.where(distance >= 0, torch.exp(-rates * distance.clamp(min=0)), 0.0)  # (H, N, N)
    out = (qh @ kh.transpose(-1, -2) * decay) @ vh
    # lambda^(N-1-s): how much of token s survives in the final state.
    key_decay = torch.exp(-rates * (length - 1 - position).view(1, -1, 1))  # (H, N, 1)
    final_state = (kh * key_decay).transpose(-1, -2) @ vh  # (B, H, d_k, d_v)
    if initial_state is not None:
        state = initial_state.to(dtype)
        out = out + (qh * torch.exp(-rates * (position + 1).view(1, -1, 1))) @ state
        final_state = final_state + torch.exp(-rates * length) * state
    out = (scale * out).transpose(1, 2).to(output_dtype or v.dtype)
    return out, (final_state if output_final_state else None)


def lightning_attn_recurrent_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay_rates: Tensor,
    *,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    output_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The token loop S_t = lambda S_{t-1} + k_t^T v_t, o_t = scale q_t S_t; with N == 1 it is a decode step."""
    if cu_seqlens is not None:
        return _per_sequence(lightning_attn_recurrent_ref, q, k, v, decay_rates, scale,
                             initial_state, output_final_state, cu_seqlens, output_dtype)
    dtype = _state_dtype(q)
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    decay = torch.exp(-decay_rates.to(dtype)).view(1, heads, 1, 1)
    if initial_state is None:
        state = torch.zeros(batch, heads, key_dim, value_dim, dtype=dtype, device=q.device)
    else:
        state = initial_state.to(dtype)
    qf, kf, vf = (x.to(dtype) for x in (q, k, v))
    outputs = []
    for t in range(length):
        state = decay * state + kf[:, t, :, :, None] * vf[:, t, :, None, :]  # (B, H, d_k, d_v)
        outputs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t], state))
    out = (scale * torch.stack(outputs, dim=1)).to(output_dtype or v.dtype)  # (B, N, H, d_v)
    return out, (state if output_final_state else None)



# The q/k feature maps the fused decode step applies itself (the model's `hidden_act` names); others take the
# unfused path.
STEP_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": torch.nn.functional.silu,
    "swish": torch.nn.functional.silu,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "none": lambda x: x,
}


def lightning_attn_step_fused_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay_rates: Tensor,
    state: Tensor,
    *,
    activation: str,
    theta: Tensor | None = None,
    position: Tensor | None = None,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """One decoding step from raw projections: q, k <- phi(q), phi(k) with phi = STEP_ACTIVATIONS[activation];
    with LRPE (`theta` (H, D), or (H, 1, D), and the token's absolute `position` (1,)), x <- [x cos(theta t),
    x sin(theta t)] (so d_k = 2 D); then S' = lambda S + k^T v, o = scale q S' (`lightning_attn_recurrent_ref`).

    q, k (B, 1, H, D) and v (B, 1, H, d_v) any float dtype; state (B, H, d_k, d_v). All arithmetic is in fp32
    (float64 for float64 inputs); returns (o (B, 1, H, d_v) in v's dtype, the new state).
    """
    dtype = _state_dtype(q)
    phi = STEP_ACTIVATIONS[activation]
    q, k = phi(q.to(dtype)), phi(k.to(dtype))
    if theta is not None:
        heads, head_dim = q.shape[2], q.shape[3]
        angles = position.to(dtype).view(1, 1, 1, 1) * theta.to(dtype).view(1, 1, heads, head_dim)  # (1, 1, H, D)
        cos, sin = torch.cos(angles), torch.sin(angles)
        q, k = (torch.cat([x * cos, x * sin], dim=-1) for x in (q, k))  # (B, 1, H, 2D)
    out, new_state = lightning_attn_recurrent_ref(
        q, k, v, decay_rates, scale=scale, initial_state=state, output_final_state=True
    )
    return out, new_state

def _block_states(contributions: Tensor, block_rates: Tensor, state_sequence: Tensor | None) -> Tensor:
    """S_b = sum_{c<b} lambda_block^(b-1-c) U_c for b = 0..blocks, one (blocks + 1) x blocks product per head:
    (B, H, blocks, X) -> (B, H, blocks + 1, X). block_rates (H,) is rate * block_size (exponents >= 0). With
    `state_sequence` (blocks + 1,), the packed sequence S_b belongs to, U_c counts only where block c ends in it."""
    blocks = contributions.shape[2]
    block = torch.arange(blocks + 1, device=contributions.device, dtype=contributions.dtype)
    distance = block[:, None] - 1 - block[None, :-1]  # b - 1 - c
    weights = torch.where(distance >= 0, torch.exp(-block_rates.view(-1, 1, 1) * distance.clamp(min=0)), 0.0)
    if state_sequence is not None:
        weights = weights * (state_sequence[None, 1:] == state_sequence[:, None])
    return weights @ contributions


def _lightning_attn_all_blocks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay_rates: Tensor,
    *,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    output_dtype: torch.dtype | None = None,
    block_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """`lightning_attn_chunk_ref` with all blocks at once, what it runs under torch.compile: no Python loop whose
    length depends on N, so one graph serves every length. Memory O(N * block). With S_b the state of the tokens
    before block b:

    S_b = sum_{c<b} lambda^(m(b-1-c)) U_c,   U_c = sum_j lambda^(m-1-j) k_j^T v_j  (block c's own contribution)

    The (blocks x blocks) weights cost O(N^2 / m^2 * d_k * d_v), as much as the rest at N ~ 2 m^2 = 8K tokens and
    growing beyond (the eager loop stays linear). The input is padded at the front to whole blocks, plus one (zero tokens add nothing;
    two blocks at least, so that torch.compile never specialises on a single one), and the initial state's share
    lambda^(t+1) q_t S_0 is added per token. The states S_b come from `_block_states`.

    Packed sequences without states (packed training) are masked by sequence index instead of looped over, so the
    boundaries are never read on the host: a pair (i, j) counts only inside one sequence, U_c holds only the
    tokens of the sequence that block c ends in, U_c reaches block b only if block b - 1 ends in that sequence too,
    and S_b reaches only the queries of that sequence. Packed sequences with states take the eager loop.
    """
    dtype = _state_dtype(q)
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    blocks = -(-length // block_size) + 1
    pad = blocks * block_size - length
    qh, kh, vh = (_heads_first(x, dtype) for x in (q, k, v))  # (B, H, N, D)
    # (B, H, blocks, m, D), zero tokens in front
    qb, kb, vb = (F.pad(x, (0, 0, pad, 0)).view(batch, heads, blocks, block_size, -1) for x in (qh, kh, vh))
    rates = decay_rates.to(dtype).view(-1, 1, 1)  # (H, 1, 1)
    index = torch.arange(block_size, device=q.device, dtype=dtype)
    distance = index[:, None] - index[None, :]
    intra_decay = torch.where(distance >= 0, torch.exp(-rates * distance.clamp(min=0)), 0.0)  # (H, m, m)
    query_decay = torch.exp(-rates * (index + 1).view(-1, 1))  # lambda^(i+1), (H, m, 1)
    key_decay = torch.exp(-rates * (block_size - 1 - index).view(-1, 1))  # lambda^(m-1-j), (H, m, 1)
    intra_decay, query_decay, key_decay = intra_decay[:, None], query_decay[:, None], key_decay[:, None]
    state_sequence = None
    if cu_seqlens is not None:  # the packed sequence each token belongs to, found on the device
        sequence_of = torch.searchsorted(cu_seqlens[1:].to(q.device), torch.arange(length, device=q.device), right=True)
        sequence_of = F.pad(sequence_of, (pad, 0)).view(blocks, block_size)  # front padding joins sequence 0
        block_end = sequence_of[:, -1]  # (blocks,): the sequence each block ends in
        state_sequence = F.pad(block_end, (1, 0))  # (blocks + 1,): the sequence S_b belongs to
        intra_decay = intra_decay * (sequence_of[:, :, None] == sequence_of[:, None, :])  # (H, blocks, m, m)
        query_decay = query_decay * (sequence_of == state_sequence[:-1, None])[..., None]  # (H, blocks, m, 1)
        key_decay = key_decay * (sequence_of == block_end[:, None])[..., None]
    intra = (qb @ kb.transpose(-1, -2) * intra_decay) @ vb  # (B, H, blocks, m, d_v)
    contributions = (kb * key_decay).transpose(-1, -2) @ vb  # U_c, (B, H, blocks, d_k, d_v)
    states = _block_states(contributions.flatten(-2), decay_rates.to(dtype) * block_size, state_sequence)
    states = states.view(batch, heads, blocks + 1, key_dim, value_dim)  # S_b, b = 0..blocks
    out = intra + (qb * query_decay) @ states[:, :, :-1]
    # (B, H, N, d_v) without the front padding; a copy, not a view, so no stride depends on the padding (a slice's
    # would make torch.compile guard on N % block_size)
    out = out.flatten(2, 3).index_select(2, torch.arange(pad, pad + length, device=q.device))
    state = states[:, :, -1]
    if initial_state is not None:
        start = initial_state.to(dtype)
        position = torch.arange(length, device=q.device, dtype=dtype)
        out = out + (qh * torch.exp(-rates * (position + 1).view(-1, 1))) @ start
        state = state + torch.exp(-rates * length) * start
    out = (scale * out).transpose(1, 2).to(output_dtype or v.dtype)  # (B, N, H, d_v)
    return out, (state if output_final_state else None)


def lightning_attn_chunk_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay_rates: Tensor,
    *,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    output_dtype: torch.dtype | None = None,
    block_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Block-wise form: memory O(N * block). Per block of m tokens (i, j = 0..m-1 inside it):

    o_i = scale * (sum_{j<=i} (q_i . k_j) lambda^(i-j) v_j  +  lambda^(i+1) q_i S)
    S  <- lambda^m S + sum_j lambda^(m-1-j) k_j^T v_j

    Packed sequences without states (packed training) are masked by sequence index instead of looped
    over, so the boundaries are never read on the host and torch.compile traces it as one graph: a pair
    (i, j) counts only inside one sequence, S reaches only queries of the sequence it belongs to, and a
    block that starts a new sequence drops the old S.
    """
    packed_with_states = cu_seqlens is not None and (initial_state is not None or output_final_state)
    if torch.compiler.is_compiling() and not packed_with_states:
        # The block loop below would unroll into a new graph for every length: compiled, all blocks run at once.
        return _lightning_attn_all_blocks(q, k, v, decay_rates, scale=scale, initial_state=initial_state,
                                          output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                          output_dtype=output_dtype, block_size=block_size)
    if packed_with_states:
        return _per_sequence(
            lambda *a, **kw: lightning_attn_chunk_ref(*a, block_size=block_size, **kw),
            q, k, v, decay_rates, scale, initial_state, output_final_state, cu_seqlens, output_dtype,
        )
    dtype = _state_dtype(q)
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    qh, kh, vh = (_heads_first(x, dtype) for x in (q, k, v))  # (B, H, N, D)
    rates = decay_rates.to(dtype).view(-1, 1, 1)  # (H, 1, 1)
    if initial_state is None:
        state = torch.zeros(batch, heads, key_dim, value_dim, dtype=dtype, device=q.device)
    else:
        state = initial_state.to(dtype)
    sequence_of = None
    if cu_seqlens is not None:  # the packed sequence each token belongs to, found on the device
        sequence_of = torch.searchsorted(cu_seqlens[1:].to(q.device), torch.arange(length, device=q.device), right=True)
    outputs = []
    for begin in range(0, length, block_size):
        size = min(block_size, length - begin)
        q_blk, k_blk, v_blk = (x[:, :, begin : begin + size] for x in (qh, kh, vh))
        index = torch.arange(size, device=q.device, dtype=dtype)
        distance = index[:, None] - index[None, :]
        intra_decay = torch.where(distance >= 0, torch.exp(-rates * distance.clamp(min=0)), 0.0)  # (H, m, m)
        query_decay = torch.exp(-rates * (index + 1).view(-1, 1))  # lambda^(i+1), (H, m, 1)
        key_decay = torch.exp(-rates * (size - 1 - index).view(-1, 1))  # lambda^(m-1-j), (H, m, 1)
        state_decay = torch.exp(-rates * size)
        if sequence_of is not None:
            block_sequences = sequence_of[begin : begin + size]
            state_sequence = sequence_of[max(begin - 1, 0)]  # S holds the tokens before this block
            intra_decay = intra_decay * (block_sequences[:, None] == block_sequences[None, :])
            query_decay = query_decay * (block_sequences == state_sequence).view(-1, 1)
            key_decay = key_decay * (block_sequences == block_sequences[-1]).view(-1, 1)
            state_decay = state_decay * (block_sequences[-1] == state_sequence)
        intra = (q_blk @ k_blk.transpose(-1, -2) * intra_decay) @ v_blk
        outputs.append(intra + (q_blk * query_decay) @ state)
        state = state_decay * state + (k_blk * key_decay).transpose(-1, -2) @ v_blk
    if outputs:
        out = torch.cat(outputs, dim=2)
    else:
        out = qh.new_zeros(batch, heads, 0, value_dim)
    out = (scale * out).transpose(1, 2).to(output_dtype or v.dtype)  # (B, N, H, d_v)
    return out, (state if output_final_state else None)


def srms_norm_ref(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Simple RMSNorm without weight: x * rsqrt(mean(x^2) + eps) over the last dim, statistics in fp32."""
    dtype = _state_dtype(x)
    xf = x.to(dtype)
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)


def gated_srms_norm_ref(x: Tensor, gate: Tensor, eps: float = 1e-6) -> Tensor:
    """TNL's attention output before out_proj: gate * srms_norm(x), the norm rounded to x's dtype first."""
    return gate * srms_norm_ref(x, eps)


def gemv_ref(x: Tensor, weight: Tensor, gate_weight: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """x @ weight^T, times x @ gate_weight^T when given (TNL's SGLU gate l1(x) * l2(x), no activation), plus
    `residual` when given (the decoder layer's skip connection)."""
    out = F.linear(x, weight)
    out = out if gate_weight is None else out * F.linear(x, gate_weight)
    return out if residual is None else residual + out
