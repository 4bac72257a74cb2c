"""Context parallelism for Lightning Attention (LASP-2, arXiv 2502.07563): one sequence split across ranks, exact.

Each rank of a process group holds one contiguous slice of the sequence (rank 0 the first tokens). The
recurrence S_t = lambda S_{t-1} + k_t^T v_t is linear, so a rank needs from the ranks before it only their
d_k x d_v states, never their keys and values:

1. every rank runs the ordinary local op from a zero state and keeps its local final state F_r (the state of
   its last packed document when the slice holds several);
2. one all-gather per layer shares the F_r (fp32, (B, H, d_k, d_v)); its backward reduce-scatters each F_r's
   gradient from every rank back onto rank r (the mirrored collective of LASP-2), so autograd gives exact
   gradients through the rest of the op with no hand-written backward;
3. the state before rank r's first token is S_in = sum_{j<r} lambda^(n_{j+1} + ... + n_{r-1}) F_j, summed from
   rank r-1 backwards and stopped after the first rank whose slice holds a document start;
4. the local output is corrected by the term the local run missed, the same term an initial state adds in
   `reference.lightning_attn_chunk_ref`: o_t += scale * lambda^(t+1) q_t S_in for the local tokens t = 0, 1, ...
   of the first local document (a document start cuts it off).

Communication is one all-gather of R states per layer forward and its mirror in backward, whatever the
sequence length. Slices are contiguous and need no load balancing: linear attention costs the same per token
wherever the token sits, unlike causal softmax attention, whose zigzag layout evens out the triangle.

A caller-supplied `initial_state` (the state before the whole sequence, to continue it) is read on the group's
first rank: it enters rank 0's output as in the plain op and rank 0's shared state as lambda^(n_0) S_0, so its
gradient lands on rank 0 alone. `output_final_state` returns the state after the whole sequence on every rank,
computed from the gathered states (no extra communication).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

Tensor = torch.Tensor


@dataclass(frozen=True)
class ContextParallelLayout:
    """Where each rank's slice sits in the sequence; the same on every rank of `group`, built once per forward.

    `lengths[j]`: tokens on rank j (every rank at least one). `continues[j]`: rank j's first token continues the
    document of the token before it (rank 0: continues `initial_state`). `single_document[j]`: rank j's slice holds
    no document start after its first token. A state crosses rank j whole only when both hold.
    """

    group: dist.ProcessGroup
    lengths: tuple[int, ...]
    continues: tuple[bool, ...]
    single_document: tuple[bool, ...]

    def __post_init__(self) -> None:
        world = dist.get_world_size(self.group)
        for name in ("lengths", "continues", "single_document"):
            if len(getattr(self, name)) != world:
                raise ValueError(f"{name} needs one entry per rank ({world}); got {getattr(self, name)}")
        if min(self.lengths) < 1:
            raise ValueError(f"every rank needs at least one token of the sequence; got lengths {self.lengths}")

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return len(self.lengths)

    @property
    def offset(self) -> int:
        """The global position of this rank's first token."""
        return sum(self.lengths[: self.rank])

    def passes_state(self, j: int) -> bool:
        """Whether a state entering rank j leaves it (decayed by lambda^(n_j)): one document, continued."""
        return self.continues[j] and self.single_document[j]


def slice_lengths(total: int, world_size: int) -> tuple[int, ...]:
    """Tokens per rank when `total` tokens are cut into `world_size` contiguous slices (the first get one more)."""
    if total < world_size:
        raise ValueError(f"a sequence of {total} tokens cannot give each of {world_size} ranks a token")
    return tuple(total // world_size + (rank < total % world_size) for rank in range(world_size))


def layout_from_cu_seqlens(group: dist.ProcessGroup, lengths: tuple[int, ...],
                           cu_seqlens: Tensor | None = None) -> tuple[ContextParallelLayout, Tensor | None]:
    """The layout of a sequence cut into `lengths` consecutive slices, and this rank's local `cu_seqlens`.

    `cu_seqlens` are the global boundaries of packed documents (B == 1), or None for one sequence per row; the
    local boundaries come back None where this rank's slice lies inside one document.
    """
    if cu_seqlens is None:
        world = len(lengths)
        return ContextParallelLayout(group, tuple(lengths), (True,) * world, (True,) * world), None
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != sum(lengths):
        raise ValueError(f"cu_seqlens must run from 0 to the total length {sum(lengths)}; got {bounds}")
    starts = set(bounds[:-1])
    offsets = [sum(lengths[:j]) for j in range(len(lengths) + 1)]
    continues = tuple(j == 0 or offsets[j] not in starts for j in range(len(lengths)))
    single = tuple(not any(offsets[j] < s < offsets[j + 1] for s in starts) for j in range(len(lengths)))
    layout = ContextParallelLayout(group, tuple(lengths), continues, single)
    begin, end = offsets[layout.rank], offsets[layout.rank + 1]
    inner = [s - begin for s in bounds if begin < s < end]
    local = None if not inner else torch.tensor([0, *inner, end - begin], dtype=torch.int64, device=cu_seqlens.device)
    return layout, local


class _AllGatherFunction(torch.autograd.Function):
    """All-gather whose backward reduce-scatters the gradients back to their owners (sums over ranks).

    `torch.distributed.nn.functional.all_gather` would do, but its gloo backward (an all-to-all made of scatters)
    passes group ranks where global ranks belong and fails on any subgroup, e.g. the cp dimension of a dp x cp
    mesh (torch 2.13). Backends without reduce-scatter (gloo) all-reduce the stacked gradients instead.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        gathered = tensor.new_empty((dist.get_world_size(group), *tensor.shape))
        dist.all_gather(list(gathered.unbind(0)), tensor.contiguous(), group=group)
        return gathered  # (R, *tensor.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == dist.Backend.GLOO:
            summed = grad.clone()  # autograd may share the incoming gradient: reduce a copy
            dist.all_reduce(summed, group=ctx.group)
            return summed[dist.get_rank(ctx.group)], None
        mine = grad.new_empty(grad.shape[1:])
        dist.reduce_scatter_tensor(mine, grad, group=ctx.group)
        return mine, None


def _gather_states(state: Tensor, layout: ContextParallelLayout) -> list[Tensor]:
    """Every rank's local final state, in rank order; differentiable (the backward sums gradients to the owner)."""
    return list(_AllGatherFunction.apply(state, layout.group).unbind(0))


def _decay(rates: Tensor, distance: int | Tensor) -> Tensor:
    """lambda^distance = exp(-rate * distance) per head, shaped to scale a (B, H, d_k, d_v) state."""
    return torch.exp(-rates * distance).view(1, -1, 1, 1)


def _query_decay(rates: Tensor, length: int) -> Tensor:
    """lambda^(t+1) for local tokens t = 0..length-1: the state before token 0 reaches o_t through t + 1 steps,
    the initial-state convention of `reference.py`. (length, H, 1)."""
    steps = torch.arange(1, length + 1, device=rates.device, dtype=rates.dtype)
    return torch.exp(-rates.view(1, -1) * steps.view(-1, 1)).unsqueeze(-1)


def _state_before(rank: int, states: list[Tensor], rates: Tensor, layout: ContextParallelLayout) -> Tensor | None:
    """The state before rank `rank`'s first token (rank == world size: after the last token), or None if zero.

    Walks back from the nearest rank: F_j arrives decayed over the tokens between them, and a rank that does not
    pass its entering state on is the last one added.
    """
    total = None
    for j in range(rank - 1, -1, -1):
        distance = sum(layout.lengths[j + 1 : rank])
        term = _decay(rates, distance) * states[j]
        total = term if total is None else total + term
        if not layout.passes_state(j):
            break
    return total


def lightning_attn_context_parallel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay_rates: Tensor,
    layout: ContextParallelLayout,
    local_op: Callable[..., tuple[Tensor, Tensor | None]],
    *,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Lightning attention over a sequence split across `layout.group`; this rank's slice in, its outputs out.

    q, k (B, n_r, H, d_k), v (B, n_r, H, d_v): this rank's slice. `cu_seqlens`: this rank's local document
    boundaries (B == 1), as `layout_from_cu_seqlens` returns them. `local_op` is the single-device op
    (`lightning_attn` with a backend bound). Returns (o (B, n_r, H, d_v), the state after the whole sequence
    on every rank or None).
    """
    if cu_seqlens is not None and (initial_state is not None or output_final_state):
        raise ValueError("context parallelism with packed documents (cu_seqlens) supports neither initial_state "
                         "nor output_final_state; continue single sequences instead")
    if q.shape[1] != layout.lengths[layout.rank]:
        raise ValueError(f"q holds {q.shape[1]} tokens but the layout gives rank {layout.rank} "
                         f"{layout.lengths[layout.rank]}")
    rank = layout.rank
    first_rank_state = initial_state if rank == 0 else None
    out, local_final = local_op(q, k, v, decay_rates, scale=scale, initial_state=None, output_final_state=True,
                                cu_seqlens=cu_seqlens)
    rates = decay_rates.to(local_final.dtype)
    if cu_seqlens is not None:
        local_final = local_final[-1:]  # the last local document's state: the only one that can cross the boundary
    if first_rank_state is not None and layout.passes_state(0):
        local_final = local_final + _decay(rates, q.shape[1]) * first_rank_state.to(local_final.dtype)
    states = _gather_states(local_final, layout)

    state_in = first_rank_state.to(local_final.dtype) if first_rank_state is not None else None
    if rank > 0 and layout.continues[rank]:
        state_in = _state_before(rank, states, rates, layout)
    else:
        # Every rank must join the all-gather's backward (a collective), also one whose output does not read the
        # gathered states (the first rank, a slice that starts a document): a zero-weight term keeps them in its
        # graph. Without it the other ranks would wait for this one forever.
        out = out + (0.0 * states[rank].sum()).to(out.dtype)
    if state_in is not None:
        # 16-bit inputs meet the state rounded to their dtype, as in the Triton kernel's inter-chunk term; an fp32
        # copy of q would be saved for backward, one more q-sized activation per layer.
        dtype = q.dtype if q.element_size() < 4 else local_final.dtype
        query = q.to(dtype) * _query_decay(rates, q.shape[1]).to(dtype)  # (B, n_r, H, d_k)
        carry = scale * torch.einsum("bnhk,bhkv->bnhv", query, state_in.to(dtype))  # (B, n_r, H, d_v)
        if cu_seqlens is not None:  # only the first local document continues the previous rank's
            first_document = torch.arange(q.shape[1], device=q.device) < cu_seqlens[1]
            carry = carry * first_document.view(1, -1, 1, 1)
        out = (out.to(carry.dtype) + carry).to(out.dtype)
    final_state = _state_before(layout.world_size, states, rates, layout) if output_final_state else None
    return out, final_state
