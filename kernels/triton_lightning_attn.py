"""Triton Lightning Attention: forward and backward, initial/final states, varlen, as a torch custom op.

The math (and the readable twin) is `reference.lightning_attn_chunk_ref`. One head, decay
lambda = exp(-rate), chunks of C tokens, positions r, s = 0..m-1 inside a chunk of m tokens:

    forward   o_r  = scale * (sum_{s<=r} lambda^(r-s) (q_r . k_s) v_s + lambda^(r+1) q_r S)
              S   <- lambda^m S + sum_s lambda^(m-1-s) k_s^T v_s
    backward  dq_r = scale * (sum_{s<=r} lambda^(r-s) (do_r . v_s) k_s + lambda^(r+1) do_r S^T)
              dv_r = scale * sum_{s>=r} lambda^(s-r) (k_r . q_s) do_s + lambda^(m-1-r) k_r G
              dk_r = scale * sum_{s>=r} lambda^(s-r) (v_r . do_s) q_s + lambda^(m-1-r) v_r G^T
              G   <- lambda^m G + scale * sum_s lambda^(s+1) q_s^T do_s      (chunks from last to first)

where G is the gradient of the state after the chunk (it starts as the final state's gradient and
ends as the initial state's). All four outputs have one shape, "a sweep over the chunks carrying a
state": out_r = sum_s decay * (a_r . b_s) c_s + decay * a_r X, X <- decay * X + sum_s decay * b_s^T c_s,
with (a, b, c, X) = (q, k, v, S) for o, (do, v, k, S^T) for dq, (k, q, do, G) for dv and
(v, do, q, G^T) for dk; dq and o sweep forward, dk and dv backward. So one kernel,
`_lightning_attn_sweep_kernel`, computes all four; a transposed state is only a swap of strides. The
forward launches it once; the backward runs the three gradient sweeps in one launch of
`_lightning_attn_bwd_kernel`, which calls it once per slot (two launches when d_k != d_v), because below
~4K tokens the host's launch cost, not the GPU, sets the time.

Each program owns one (value slice, sequence, head) and walks that sequence's chunks in order,
keeping its slice of the state in fp32 registers: no per-chunk states are written to memory, the
backward recomputes them, and the extra memory is only the outputs. Every decay factor is
exp(-rate * distance) with distance >= 0, so no rate can overflow it.

That grid is small when few long sequences meet few heads (TNL-1B at 32K: B=1, H=16, 2 slices = 32
programs on 132 SMs) or when a varlen batch packs a few long sequences. Then `_sweep` cuts sequences
of 16K tokens or more into segments of L tokens (a power of two >= 512, sized so there are about two
programs per SM) and runs each as a sequence of its own: because the state recurrence is linear, the
state entering a segment is the decayed sum of the zero-start final states of the segments before it
(after it, for the reverse sweeps) plus the decayed initial state. Pass 1 computes those partial
states only (no outputs), one batched matmul carries them, pass 2 writes the outputs; two fp32 states
per segment of extra memory. The split is taken only where the natural grid has fewer programs than
the GPU needs, the sequence is long enough for the GPU rather than the host to set the time, and it
shortens the longest serial walk at least 2x. A backward that splits runs its three sweeps one by one;
dk then reuses the segment states of dv's pass 1 and carry (its state G^T is dv's G transposed).

Precision: bf16 inputs feed the tensor cores directly (P and the state are rounded to bf16 for their
products, as in fla). fp32 inputs follow torch's matmul precision (`fp32_dot_precision`): IEEE products under
"highest" (torch's default), TF32 when torch allows it; it is a custom-op argument and the INPUT_PRECISION
constexpr. fp16 inputs are computed in fp32 with TF32 products: fp16's mantissa, but fp32's range for the
scores and the state, which outgrow fp16 on long inputs (no softmax denominator). Launch configurations are
picked before launch to fit the device's shared memory (`_launch_config`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .triton_device import on_device, shared_memory_limit

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CHUNK_SIZE = 64


@triton.jit
def _lightning_attn_sweep_kernel(
    a_ptr, b_ptr, c_ptr, out_ptr, rates_ptr, state_in_ptr, state_out_ptr, seq_starts_ptr, seq_ends_ptr,
    seq_len,
    stride_a_t, stride_a_h, stride_b_t, stride_b_h, stride_c_t, stride_c_h, stride_o_t, stride_o_h,
    stride_si_n, stride_si_h, stride_si_a, stride_si_c,
    stride_so_n, stride_so_h, stride_so_a, stride_so_c,
    intra_scale, inter_scale, update_scale,
    DIM_A: tl.constexpr, DIM_C: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr,
    C_SLICES: tl.constexpr, CHUNK: tl.constexpr, REVERSE: tl.constexpr, HAS_STATE_IN: tl.constexpr,
    STORE_STATE_OUT: tl.constexpr, STORE_OUT: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """out[t, h, slice] for one program (c slice, sequence i_n, head i_h); see the module docstring for the roles
    of a, b, c. Program id 0 modulo C_SLICES is the c slice, so the backward kernel can call this one for
    each of its slots.

    Sequence i_n is tokens [seq_starts[i_n], seq_ends[i_n]) when VARLEN, else [i_n * seq_len, ...).
    Without STORE_OUT only the final state is computed (the split's pass 1): `a` is never read.
    """
    i_c, i_n, i_h = tl.program_id(0) % C_SLICES, tl.program_id(1), tl.program_id(2)
    if VARLEN:
        bos = tl.load(seq_starts_ptr + i_n).to(tl.int64)
        eos = tl.load(seq_ends_ptr + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * seq_len
        eos = bos + seq_len
    num_chunks = tl.cdiv(eos - bos, CHUNK)
    log2_decay = -tl.load(rates_ptr + i_h).to(tl.float32) * 1.4426950408889634  # lambda^n = exp2(n * this)

    o_r = tl.arange(0, CHUNK)
    o_a = tl.arange(0, BLOCK_A)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_a = o_a < DIM_A
    m_c = o_c < DIM_C

    # Intra-chunk decay lambda^|r - s| on the causal side (s <= r forward, s >= r backward), 0 elsewhere.
    if REVERSE:
        distance = o_r[None, :] - o_r[:, None]
    else:
        distance = o_r[:, None] - o_r[None, :]
    causal = distance >= 0
    intra_decay = tl.where(causal, tl.exp2(log2_decay * tl.where(causal, distance, 0).to(tl.float32)), 0.0)
    intra_decay = intra_decay * intra_scale

    b_state = tl.zeros([BLOCK_A, BLOCK_C], dtype=tl.float32)
    if HAS_STATE_IN:
        p_si = (state_in_ptr + i_n.to(tl.int64) * stride_si_n + i_h * stride_si_h
                + o_a[:, None] * stride_si_a + o_c[None, :] * stride_si_c)
        b_state = tl.load(p_si, mask=m_a[:, None] & m_c[None, :], other=0.0).to(tl.float32)

    p_a0 = a_ptr + i_h * stride_a_h + o_a[None, :]
    p_b0 = b_ptr + i_h * stride_b_h + o_a[None, :]
    p_c0 = c_ptr + i_h * stride_c_h + o_c[None, :]
    p_o0 = out_ptr + i_h * stride_o_h + o_c[None, :]
    for i_step in range(0, num_chunks):
        if REVERSE:
            i_chunk = num_chunks - 1 - i_step
        else:
            i_chunk = i_step
        t0 = bos + i_chunk * CHUNK
        size = tl.minimum(eos - t0, CHUNK).to(tl.int32)
        m_r = o_r < size
        rows = (t0 + o_r)[:, None]
        b_b = tl.load(p_b0 + rows * stride_b_t, mask=m_r[:, None] & m_a[None, :], other=0.0)
        b_c = tl.load(p_c0 + rows * stride_c_t, mask=m_r[:, None] & m_c[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 arithmetic is wrong; fp32 everywhere there
            b_b, b_c = b_b.to(tl.float32), b_c.to(tl.float32)
        if REVERSE:
            out_exp = size - 1 - o_r
            update_exp = o_r + 1
        else:
            out_exp = o_r + 1
            update_exp = size - 1 - o_r
        if STORE_OUT:
            b_a = tl.load(p_a0 + rows * stride_a_t, mask=m_r[:, None] & m_a[None, :], other=0.0)
            if UPCAST:
                b_a = b_a.to(tl.float32)
            out_decay = tl.where(m_r, tl.exp2(log2_decay * tl.where(m_r, out_exp, 0).to(tl.float32)), 0.0)
            b_scores = tl.dot(b_a, tl.trans(b_b), input_precision=INPUT_PRECISION) * intra_decay  # (CHUNK, CHUNK) fp32
            b_out = tl.dot(b_scores.to(b_c.dtype), b_c, input_precision=INPUT_PRECISION)
            b_inter = tl.dot(b_a, b_state.to(b_a.dtype), input_precision=INPUT_PRECISION)
            b_out += b_inter * (out_decay * inter_scale)[:, None]
            tl.store(p_o0 + rows * stride_o_t, b_out.to(out_ptr.dtype.element_ty), mask=m_r[:, None] & m_c[None, :])

        update_decay = tl.where(m_r, tl.exp2(log2_decay * tl.where(m_r, update_exp, 0).to(tl.float32)), 0.0)
        b_b_decayed = (b_b * (update_decay * update_scale)[:, None]).to(b_c.dtype)
        b_state = b_state * tl.exp2(log2_decay * size.to(tl.float32)) + tl.dot(tl.trans(b_b_decayed), b_c,
                                                                        input_precision=INPUT_PRECISION)

    if STORE_STATE_OUT:
        p_so = (state_out_ptr + i_n.to(tl.int64) * stride_so_n + i_h * stride_so_h
                + o_a[:, None] * stride_so_a + o_c[None, :] * stride_so_c)
        tl.store(p_so, b_state, mask=m_a[:, None] & m_c[None, :])


@triton.jit
def _lightning_attn_bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, rates_ptr, h0_ptr, dht_ptr, dh0_ptr,
    seq_starts_ptr, seq_ends_ptr, seq_len,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_do_t, stride_do_h,
    stride_dq_t, stride_dq_h, stride_dk_t, stride_dk_h, stride_dv_t, stride_dv_h,
    stride_h0_n, stride_h0_h, stride_h0_k, stride_h0_v,
    stride_dht_n, stride_dht_h, stride_dht_k, stride_dht_v,
    stride_dh0_n, stride_dh0_h, stride_dh0_k, stride_dh0_v,
    scale,
    KEY_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr,
    C_SLICES: tl.constexpr, DQ_SLOT: tl.constexpr, DK_SLOT: tl.constexpr, DV_SLOT: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    CHUNK: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Several gradient sweeps in one launch: program id 0 is (slot, c slice), and the slot picks dq, dk or dv
    (a slot of -1: not in this launch). One launch instead of three saves host time, which bounds short inputs."""
    slot = tl.program_id(0) // C_SLICES
    if DQ_SLOT >= 0:
        if slot == DQ_SLOT:  # (a, b, c, X) = (do, v, k, S^T), forward
            _lightning_attn_sweep_kernel(
                do_ptr, v_ptr, k_ptr, dq_ptr, rates_ptr, h0_ptr, h0_ptr, seq_starts_ptr, seq_ends_ptr,
                seq_len, stride_do_t, stride_do_h, stride_v_t, stride_v_h, stride_k_t, stride_k_h,
                stride_dq_t, stride_dq_h, stride_h0_n, stride_h0_h, stride_h0_v, stride_h0_k, 0, 0, 0, 0,
                scale, scale, 1.0,
                VALUE_DIM, KEY_DIM, BLOCK_A, BLOCK_C, C_SLICES, CHUNK, False, HAS_H0, False, True, VARLEN, UPCAST,
                INPUT_PRECISION,
            )
    if DK_SLOT >= 0:
        if slot == DK_SLOT:  # (v, do, q, G^T), reverse
            _lightning_attn_sweep_kernel(
                v_ptr, do_ptr, q_ptr, dk_ptr, rates_ptr, dht_ptr, dht_ptr, seq_starts_ptr, seq_ends_ptr,
                seq_len, stride_v_t, stride_v_h, stride_do_t, stride_do_h, stride_q_t, stride_q_h,
                stride_dk_t, stride_dk_h, stride_dht_n, stride_dht_h, stride_dht_v, stride_dht_k, 0, 0, 0, 0,
                scale, 1.0, scale,
                VALUE_DIM, KEY_DIM, BLOCK_A, BLOCK_C, C_SLICES, CHUNK, True, HAS_DHT, False, True, VARLEN, UPCAST,
                INPUT_PRECISION,
            )
    if DV_SLOT >= 0:
        if slot == DV_SLOT:  # (k, q, do, G), reverse; G ends as the initial state's gradient
            _lightning_attn_sweep_kernel(
                k_ptr, q_ptr, do_ptr, dv_ptr, rates_ptr, dht_ptr, dh0_ptr, seq_starts_ptr, seq_ends_ptr,
                seq_len, stride_k_t, stride_k_h, stride_q_t, stride_q_h, stride_do_t, stride_do_h,
                stride_dv_t, stride_dv_h, stride_dht_n, stride_dht_h, stride_dht_k, stride_dht_v,
                stride_dh0_n, stride_dh0_h, stride_dh0_k, stride_dh0_v,
                scale, 1.0, scale,
                KEY_DIM, VALUE_DIM, BLOCK_A, BLOCK_C, C_SLICES, CHUNK, True, HAS_DHT, STORE_DH0, True, VARLEN, UPCAST,
                INPUT_PRECISION,
            )


@torch.compiler.assume_constant_result  # Dynamo guards on torch's matmul precision itself, so a change recompiles
def fp32_dot_precision() -> str:
    """"tf32" when torch allows TF32 for fp32 CUDA matmuls ("high"/"medium", allow_tf32), else "ieee" (the default).

    Read at each call; the custom ops take it as an argument, so it is part of a compiled graph and of the
    kernels' compile key (the INPUT_PRECISION constexpr). 16-bit inputs ignore it.
    """
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; reflects the legacy setters as well
        return "tf32" if matmul.fp32_precision == "tf32" else "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _shared_memory_estimate(block_a: int, block_c: int, num_stages: int, itemsize: int) -> int:
    """An upper bound of the sweep's shared memory: `num_stages` buffers of one chunk's a, b and c tiles, plus,
    without a pipeline to reuse, one more a-wide tile for the tensor-core operand staging (TF32 at d = 256:
    212992 bytes with 1 stage). Exact for TF32 and bf16 dots; IEEE fp32 dots and the split's pass 1 (which never
    loads `a`) need less. tests/test_gpu_compile.py checks it against the kernels compiled for sm_90."""
    staging = CHUNK_SIZE * block_a * itemsize if num_stages == 1 else 0
    return num_stages * CHUNK_SIZE * (2 * block_a + block_c) * itemsize + staging


@functools.lru_cache(maxsize=None)  # triton's next_power_of_2 costs microseconds on the host, per call
def _launch_config(dim_a: int, dim_c: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_A, BLOCK_C, num_warps, num_stages): the whole a/b width in one tile, the c width in slices.

    Measured on an H100 (benchmarks/results/attention_h100_8warps.json, "launch_configs"): at d = 128,
    4 warps run forward+backward 1.7x faster than 8; at d_k = 256, 8 warps and 3 stages were best (bf16).
    Chosen before launch to fit the device's shared memory: fewer pipeline stages first, then narrower c
    slices (fp32 and fp16, computed in fp32, at d = 256 on an H100: 1 stage; bf16 keeps the tuned configs).
    """
    block_a = max(16, triton.next_power_of_2(dim_a))
    block_c = max(16, min(64, triton.next_power_of_2(dim_c)))
    num_warps, num_stages = (4, 2) if block_a <= 128 else (8, 3)
    itemsize, limit = _tile_itemsize(dtype), shared_memory_limit(device)
    while num_stages > 1 and _shared_memory_estimate(block_a, block_c, num_stages, itemsize) > limit:
        num_stages -= 1
    while block_c > 16 and _shared_memory_estimate(block_a, block_c, num_stages, itemsize) > limit:
        block_c //= 2
    needed = _shared_memory_estimate(block_a, block_c, num_stages, itemsize)
    if needed > limit:
        raise ValueError(
            f"the Triton Lightning Attention kernel cannot hold d_k/d_v = {dim_a}/{dim_c} in {dtype} within this "
            f"GPU's shared memory ({needed} bytes needed, {limit} available); use backend='torch' or smaller heads"
        )
    return block_a, block_c, num_warps, num_stages


# ---- splitting long sequences into segments (more programs when the natural grid is too small) ----

_MIN_SEGMENT = 512  # tokens: shorter segments would gain less than the extra launch and states cost
# Sequences shorter than this are never split: the split's extra launches (pass 1 and the carry's small ops, for
# each of the four sweeps) cost more host time than the shorter walk saves. On an H100, B=2 H=32 N=8K took
# 2.39 ms forward+backward split against 1.86 ms for twice the work unsplit (B=4); 32K and longer gain 2-5x.
_MIN_SPLIT_TOKENS = 16384
_SPLIT_GAIN = 2.0  # split only if the longest serial walk shrinks this much (pass 1 costs about half a sweep)
_MAX_SEGMENT_PROGRAMS = 4  # at most this many target-grids of segment programs; bounds the fp32 segment states
_PROGRAMS_PER_SM = 2  # a 4-warp program alone cannot use an SM's share of HBM bandwidth
_TARGET_PROGRAMS_OFF_CUDA = 264  # as on an H100 (132 SMs), so that the interpreter tests take the split path


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    """How many programs keep the device busy."""
    if device.type != "cuda":
        return _TARGET_PROGRAMS_OFF_CUDA
    return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _segment_length(total_tokens: int, longest: int, programs_per_segment: int, target: int) -> int | None:
    """Tokens per segment (a power of two >= _MIN_SEGMENT, so a multiple of CHUNK_SIZE), or None for no split.

    `balanced` is each program's share if the work spread evenly over `target` programs; segments of
    about that length (rounded down to a power of two, so there are at least `target` programs) make
    the longest serial walk about `balanced`. Without a split it is `longest`; sequences
    shorter than _MIN_SPLIT_TOKENS stay whole.
    """
    if longest < _MIN_SPLIT_TOKENS:
        return None
    balanced = total_tokens * programs_per_segment / target
    length = max(_MIN_SEGMENT, 1 << (max(int(balanced), 1).bit_length() - 1))
    return length if longest > _SPLIT_GAIN * max(length, balanced) else None


class _SegmentPlan(NamedTuple):
    """Device tensors describing one split. Segments are [starts[g], ends[g]); sources are the segments whose
    zero-start final state ("partial state") some target needs; targets are the boundaries where the carried
    state is wanted: each segment's entry (its start forward, its end in reverse), then each sequence's exit
    (its end forward, its start in reverse) when the caller wants the sweep's final state."""

    starts: torch.Tensor  # (G,) int64
    ends: torch.Tensor  # (G,) int64
    source_starts: torch.Tensor  # (S,) int64
    source_ends: torch.Tensor  # (S,) int64
    distances: torch.Tensor  # (T, S) fp32: tokens from source to target, the decay exponent (0 where not reached)
    reaches: torch.Tensor  # (T, S) bool: the source is in the target's sequence and before it (after it in reverse)
    origin_distances: torch.Tensor  # (T,) fp32: tokens from the sequence's start (end in reverse) to the target
    target_seqs: torch.Tensor  # (T,) int64: the target's sequence, to pick its state_in


def _segment_plan(bounds: tuple[tuple[int, int], ...], length: int, reverse: bool, with_exits: bool,
                  device: torch.device) -> _SegmentPlan:
    """The plan for sequences [bos, eos) cut every `length` tokens from bos (so segments keep the unsplit
    chunk boundaries). Built on the host, one copy to the device."""
    segments = [(start, min(start + length, eos), seq)
                for seq, (bos, eos) in enumerate(bounds) for start in range(bos, eos, length)]
    # targets: (position, sequence, tokens from the sequence's start, or from its end in reverse)
    if reverse:  # partial states carry to earlier segments; the first segment's reaches only the exit
        sources = [seg for seg in segments if seg[0] > bounds[seg[2]][0] or with_exits]
        targets = [(end, seq, bounds[seq][1] - end) for _, end, seq in segments]
        exits = [(bos, seq, eos - bos) for seq, (bos, eos) in enumerate(bounds)]
    else:  # partial states carry to later segments; the last segment's reaches only the exit
        sources = [seg for seg in segments if seg[1] < bounds[seg[2]][1] or with_exits]
        targets = [(start, seq, start - bounds[seq][0]) for start, _, seq in segments]
        exits = [(eos, seq, eos - bos) for seq, (bos, eos) in enumerate(bounds)]
    if with_exits:
        targets += exits
    columns = (*zip(*segments), *zip(*sources), *zip(*targets))
    flat = torch.tensor([x for column in columns for x in column], dtype=torch.int64).to(device)
    (starts, ends, _, source_starts, source_ends, source_seqs,
     target_positions, target_seqs, origin_distances) = flat.split([len(column) for column in columns])
    if reverse:
        distances = source_starts[None, :] - target_positions[:, None]
    else:
        distances = target_positions[:, None] - source_ends[None, :]
    reaches = (target_seqs[:, None] == source_seqs[None, :]) & (distances >= 0)
    return _SegmentPlan(starts, ends, source_starts, source_ends, distances.clamp(min=0).float(), reaches,
                        origin_distances.float(), target_seqs)


# Fixed-length shapes repeat every step (and a CUDA graph replay must not copy); varlen batches rarely do.
_fixed_length_segment_plan = functools.lru_cache(maxsize=32)(_segment_plan)


def _plan_split(total_tokens: int, programs_per_segment: int, host_cu_seqlens: Callable[[], list[int]] | None,
                seq_len: int, num_seqs: int, reverse: bool, with_exits: bool,
                device: torch.device) -> _SegmentPlan | None:
    """A split plan when the (c slices, sequences, heads) grid is smaller than the GPU needs, else None.
    Varlen input needs its lengths on the host: `host_cu_seqlens()` (a cached `.tolist()`, one device sync
    per op call) is called only when a split is possible at all."""
    target = _target_programs(device)
    if num_seqs * programs_per_segment >= target:
        # The natural grid already fills the GPU; a long sequence among many short ones then only leaves a
        # tail, and on an H100 splitting such a varlen batch (one 16K sequence among nine of 1.8K, H = 32) was
        # slower (5.9 ms fwd+bwd against 4.6): the lengths' host sync plus pass 1 cost more than the tail.
        return None
    longest = seq_len if host_cu_seqlens is None else total_tokens  # varlen: an upper bound before the sync
    if _segment_length(total_tokens, longest, programs_per_segment, target) is None:
        return None
    build_plan = _segment_plan
    if host_cu_seqlens is None:
        bounds = tuple((seq * seq_len, (seq + 1) * seq_len) for seq in range(num_seqs))
        build_plan = _fixed_length_segment_plan
    else:
        boundaries = host_cu_seqlens()
        bounds = tuple(zip(boundaries[:-1], boundaries[1:]))
        longest = max(eos - bos for bos, eos in bounds)
    length = _segment_length(total_tokens, longest, programs_per_segment, target)
    if length is None:
        return None
    num_segments = sum(-(-(eos - bos) // length) for bos, eos in bounds)
    if num_segments * programs_per_segment > _MAX_SEGMENT_PROGRAMS * target:
        return None
    return build_plan(bounds, length, reverse, with_exits, device)


def _carry_states(partial: torch.Tensor, plan: _SegmentPlan, state_in: torch.Tensor | None,
                  rates: torch.Tensor) -> torch.Tensor:
    """(T, H, A, C) fp32 states at the plan's targets from the (H, S, A, C) partial states: the decayed sum of
    those that reach each target, plus the decayed state_in of its sequence. One matmul per head, no loop
    over segments."""
    heads, _, dim_a, dim_c = partial.shape
    weights = torch.exp(-rates[:, None, None] * plan.distances) * plan.reaches  # (H, T, S)
    states = torch.bmm(weights, partial.flatten(2)).view(heads, -1, dim_a, dim_c).transpose(0, 1)
    if state_in is not None:
        origin_weights = torch.exp(-rates[None, :] * plan.origin_distances[:, None])  # (T, H)
        states += origin_weights[:, :, None, None] * state_in[plan.target_seqs]
    return states


def _launch_sweep(a, b, c, out, rates, state_in, state_out, seq_bounds, *, seq_len, num_seqs, scales,
                  reverse, store_out, precision):
    """One launch over (c slices, sequences, heads). States are fp32 (seqs, H, dim_a, dim_c) views of any
    strides; `seq_bounds` is (starts, ends) of each sequence, or None for num_seqs runs of seq_len tokens."""
    heads, dim_a, dim_c = a.shape[-2], a.shape[-1], c.shape[-1]
    block_a, block_c, num_warps, num_stages = _launch_config(dim_a, dim_c, a.dtype, a.device)
    seq_starts, seq_ends = seq_bounds if seq_bounds is not None else (None, None)
    c_slices = -(-dim_c // block_c)
    with on_device(a):
        _lightning_attn_sweep_kernel[(c_slices, num_seqs, heads)](
            a, b, c, out, rates, state_in, state_out, seq_starts, seq_ends,
            seq_len,
            a.stride(-3), a.stride(-2), b.stride(-3), b.stride(-2), c.stride(-3), c.stride(-2),
            out.stride(-3), out.stride(-2),
            *_state_strides(state_in), *_state_strides(state_out),
            *scales,
            DIM_A=dim_a, DIM_C=dim_c, BLOCK_A=block_a, BLOCK_C=block_c, C_SLICES=c_slices, CHUNK=CHUNK_SIZE,
            REVERSE=reverse, HAS_STATE_IN=state_in is not None, STORE_STATE_OUT=state_out is not None,
            STORE_OUT=store_out, VARLEN=seq_bounds is not None, UPCAST=_upcast(a.dtype),
            INPUT_PRECISION=_input_precision(a.dtype, precision), num_warps=num_warps, num_stages=num_stages,
        )


def _upcast(dtype: torch.dtype) -> bool:
    """Whether the kernel turns its loaded tiles into fp32: under the interpreter (whose bf16 arithmetic is wrong)
    and for fp16, whose range the scores and the state outgrow (no softmax denominator: on long inputs the state
    and the output reach 1e5 and more, past fp16's 65504); bf16 has fp32's range and keeps 16-bit dots."""
    return _INTERPRET or dtype == torch.float16


def _tile_itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of the tiles the dots read: fp32 when the kernel upcasts, else the input's."""
    return 4 if _upcast(dtype) else dtype.itemsize


def _input_precision(dtype: torch.dtype, fp32_precision: str) -> str | None:
    """The dots' input_precision: `fp32_precision` for fp32 inputs; for fp16 inputs, computed in fp32, three TF32
    products per product ("tf32x3", fp32's accuracy on the tensor cores): the inputs are exact in TF32, but the
    fp32 scores and the decayed keys and state are not, and single TF32 products left an fp16 model's state 6.6e-4
    off float64 on the H200 (the fp32 twin: 1e-7). Triton's default (unused) for bf16, so its kernels stay as tuned."""
    if dtype == torch.float16:
        return "tf32x3"
    return fp32_precision if dtype == torch.float32 else None


def _state_strides(state: torch.Tensor | None) -> tuple[int, ...]:
    return state.stride() if state is not None else (0, 0, 0, 0)


def _launch_backward(roles, dims, q, k, v, do, dq, dk, dv, rates, h0, dht, dh0, cu_seqlens, *, seq_len, num_seqs,
                     scale, precision):
    """One launch of the gradient sweeps `roles` (a tuple of "dq", "dk", "dv" whose kernel (dim_a, dim_c) are
    both `dims`, so they share one launch config); tensors as in `_lightning_attn_bwd`."""
    heads, key_dim, value_dim = q.shape[-2], q.shape[-1], v.shape[-1]
    block_a, block_c, num_warps, num_stages = _launch_config(*dims, q.dtype, q.device)
    c_slices = -(-dims[1] // block_c)
    seq_starts, seq_ends = (cu_seqlens[:-1], cu_seqlens[1:]) if cu_seqlens is not None else (None, None)
    slots = {role: roles.index(role) if role in roles else -1 for role in ("dq", "dk", "dv")}
    with on_device(q):
        _lightning_attn_bwd_kernel[(len(roles) * c_slices, num_seqs, heads)](
            q, k, v, do, dq, dk, dv, rates, h0, dht, dh0, seq_starts, seq_ends, seq_len,
            *(stride for x in (q, k, v, do, dq, dk, dv) for stride in (x.stride(-3), x.stride(-2))),
            *_state_strides(h0), *_state_strides(dht), *_state_strides(dh0),
            scale,
            KEY_DIM=key_dim, VALUE_DIM=value_dim, BLOCK_A=block_a, BLOCK_C=block_c, C_SLICES=c_slices,
            DQ_SLOT=slots["dq"], DK_SLOT=slots["dk"], DV_SLOT=slots["dv"],
            HAS_H0=h0 is not None, HAS_DHT=dht is not None, STORE_DH0=dh0 is not None,
            CHUNK=CHUNK_SIZE, VARLEN=cu_seqlens is not None, UPCAST=_upcast(q.dtype),
            INPUT_PRECISION=_input_precision(q.dtype, precision),
            num_warps=num_warps, num_stages=num_stages,
        )


class _Sequences(NamedTuple):
    """The sequences of one call: tokens per sequence (fixed-length layout, else 0), how many, and for varlen
    a cached `cu_seqlens.tolist()` (called only if a sweep may split; None for the fixed-length layout)."""

    seq_len: int
    num_seqs: int
    host_cu_seqlens: Callable[[], list[int]] | None


def _sequences(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> _Sequences:
    if cu_seqlens is None:
        return _Sequences(q.shape[1], q.shape[0], None)
    return _Sequences(0, cu_seqlens.numel() - 1, functools.cache(cu_seqlens.tolist))


def _plan_sweep(a: torch.Tensor, c: torch.Tensor, sequences: _Sequences, reverse: bool,
                with_exits: bool) -> _SegmentPlan | None:
    """`_plan_split` for the sweep with inputs a (tokens, H, dim_a) and c (tokens, H, dim_c)."""
    heads, dim_a, dim_c = a.shape[-2], a.shape[-1], c.shape[-1]
    c_slices = -(-dim_c // _launch_config(dim_a, dim_c, a.dtype, a.device)[1])
    return _plan_split(a.shape[0], c_slices * heads, sequences.host_cu_seqlens, sequences.seq_len,
                       sequences.num_seqs, reverse, with_exits, a.device)


def _sweep(a, b, c, out, rates, state_in, state_out, cu_seqlens, plan, sequences, *, scales, reverse,
           transpose_state, precision, entry_states=None):
    """Compute `out` (and `state_out`) of one sweep, split into segments when `plan` is not None. States are
    (seqs, H, d_k, d_v) fp32; `transpose_state` reads/writes them as (seqs, H, d_v, d_k) for the dq/dk sweeps.

    A split runs in three steps: pass 1 sweeps each segment from a zero state and keeps only its final
    ("partial") state; the state entering each segment is then the decayed sum of the partial states of the
    segments before it (after it in reverse) plus the decayed state_in (`_carry_states`, one matmul); pass 2
    sweeps the segments again from those states and writes `out`. The extra memory is two fp32 states per
    segment. Returns the states entering the segments (kernel orientation), or None without a split; given
    as `entry_states`, they replace pass 1 and the carry (the dk sweep reuses the dv sweep's, transposed).
    """
    if transpose_state:  # the kernel's (dim_a, dim_c) = (d_v, d_k): swap strides, not data
        state_in, state_out = (s.transpose(-1, -2) if s is not None else None for s in (state_in, state_out))
    if plan is None:
        seq_bounds = (cu_seqlens[:-1], cu_seqlens[1:]) if cu_seqlens is not None else None
        _launch_sweep(a, b, c, out, rates, state_in, state_out, seq_bounds, seq_len=sequences.seq_len,
                      num_seqs=sequences.num_seqs, scales=scales, reverse=reverse, store_out=True,
                      precision=precision)
        return None
    sweep = functools.partial(_launch_sweep, a, b, c, out, rates, seq_len=0, scales=scales, reverse=reverse,
                              precision=precision)
    num_segments = plan.starts.numel()
    if entry_states is None:
        heads, dim_a, dim_c = a.shape[-2], a.shape[-1], c.shape[-1]
        num_sources = plan.source_starts.numel()
        partial = a.new_empty((heads, num_sources, dim_a, dim_c), dtype=torch.float32)  # head-major for the carry
        sweep(None, partial.transpose(0, 1), (plan.source_starts, plan.source_ends), num_seqs=num_sources,
              store_out=False)
        carried = _carry_states(partial, plan, state_in, rates)
        if state_out is not None:
            state_out.copy_(carried[num_segments:])
        entry_states = carried[:num_segments]
    sweep(entry_states, None, (plan.starts, plan.ends), num_seqs=num_segments, store_out=True)
    return entry_states


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, N, H, D) -> (B*N, H, D) without a copy when the token dims are uniformly strided."""
    if x.stride(-1) != 1 or x.stride(0) != x.shape[1] * x.stride(1):
        x = x.contiguous()
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _state_or_empty(wanted: bool, num_seqs: int, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An fp32 (seqs, H, d_k, d_v) state buffer, or a 0-element tensor (custom ops cannot return None)."""
    shape = (num_seqs, q.shape[-2], q.shape[-1], v.shape[-1]) if wanted else (0,)
    return q.new_empty(shape, dtype=torch.float32)


def _lightning_attn_fwd(q, k, v, decay_rates, scale, initial_state, output_final_state, cu_seqlens, output_dtype,
                        precision):
    """Returns (o in `output_dtype`, final state fp32 (seqs, H, d_k, d_v), or an empty tensor when not asked)."""
    for dims in ((q.shape[-1], v.shape[-1]), (v.shape[-1], q.shape[-1])):  # forward and backward sweeps
        _launch_config(*dims, q.dtype, q.device)  # a clear error before any launch when the heads cannot fit
    sequences = _sequences(q, cu_seqlens)
    q, k, v_flat = _flat(q), _flat(k), _flat(v)
    o = torch.empty(v.shape, dtype=output_dtype, device=v.device)
    final_state = _state_or_empty(output_final_state, sequences.num_seqs, q, v)
    plan = _plan_sweep(q, v_flat, sequences, reverse=False, with_exits=output_final_state)
    _sweep(q, k, v_flat, o.view(v_flat.shape), decay_rates, initial_state,
           final_state if output_final_state else None, cu_seqlens, plan, sequences,
           scales=(scale, scale, 1.0), reverse=False, transpose_state=False, precision=precision)
    return o, final_state


def _lightning_attn_bwd(q, k, v, decay_rates, scale, initial_state, cu_seqlens, do, dht, precision):
    """Returns (dq, dk, dv, dh0 fp32 (seqs, H, d_k, d_v)); states are recomputed, none is stored.

    Without a split, the three gradient sweeps take one launch (two when d_k != d_v: their launch configs
    differ); a sweep that splits runs each on its own (`_sweep`)."""
    sequences = _sequences(q, cu_seqlens)
    shapes = (q.shape, k.shape, v.shape)
    q, k, v, do = _flat(q), _flat(k), _flat(v), _flat(do)
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    dh0 = _state_or_empty(initial_state is not None, sequences.num_seqs, q, v)
    dh0_out = dh0 if initial_state is not None else None
    # name: (a, b, c, out, state_in, state_out, scales, reverse, transpose_state); see the module docstring
    sweeps = {
        "dq": (do, v, k, dq, initial_state, None, (scale, scale, 1.0), False, True),
        "dk": (v, do, q, dk, dht, None, (scale, 1.0, scale), True, True),
        "dv": (k, q, do, dv, dht, dh0_out, (scale, 1.0, scale), True, False),
    }
    plans = {name: _plan_sweep(a, c, sequences, reverse, state_out is not None)
             for name, (a, _, c, _, _, state_out, _, reverse, _) in sweeps.items() if name != "dk"}
    # dk's state is dv's transposed (G^T): when dv splits, dk sweeps dv's segments from dv's entry states (pass 2
    # alone, no more work than sweeping whole sequences).
    shared = plans["dv"] is not None
    plans["dk"] = plans["dv"] if shared else _plan_sweep(v, q, sequences, reverse=True, with_exits=False)
    if any(plan is not None for plan in plans.values()):
        dv_entry_states = None
        for name in ("dq", "dv", "dk"):
            a, b, c, out, state_in, state_out, scales, reverse, transpose_state = sweeps[name]
            reused = dv_entry_states.transpose(-1, -2) if name == "dk" and shared else None
            entry_states = _sweep(a, b, c, out, decay_rates, state_in, state_out, cu_seqlens, plans[name], sequences,
                                  scales=scales, reverse=reverse, transpose_state=transpose_state, precision=precision,
                                  entry_states=reused)
            if name == "dv":
                dv_entry_states = entry_states
    else:
        key_dim, value_dim = q.shape[-1], v.shape[-1]
        groups = {("dq", "dk", "dv"): (value_dim, key_dim)} if key_dim == value_dim else {
            ("dq", "dk"): (value_dim, key_dim), ("dv",): (key_dim, value_dim)}
        for roles, dims in groups.items():
            _launch_backward(roles, dims, q, k, v, do, dq, dk, dv, decay_rates, initial_state, dht, dh0_out,
                             cu_seqlens, seq_len=sequences.seq_len, num_seqs=sequences.num_seqs, scale=scale,
                             precision=precision)
    dq, dk, dv = (grad.view(shape) for grad, shape in zip((dq, dk, dv), shapes))
    return dq, dk, dv, dh0


# ---- torch custom ops: torch.compile traces through them (fake impls), autograd and checkpointing work ----

@torch.library.custom_op("transnormer_hf::lightning_attn_fwd", mutates_args=(), device_types=("cuda", "cpu"))
def lightning_attn_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay_rates: torch.Tensor, scale: float,
    initial_state: torch.Tensor | None, output_final_state: bool, cu_seqlens: torch.Tensor | None,
    output_dtype: torch.dtype, precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: (o, final_state fp32 or a 0-element tensor); `precision` is fp32 inputs' dot precision."""
    return _lightning_attn_fwd(q, k, v, decay_rates, scale, initial_state, output_final_state, cu_seqlens,
                               output_dtype, precision)


@lightning_attn_fwd_op.register_fake
def _(q, k, v, decay_rates, scale, initial_state, output_final_state, cu_seqlens, output_dtype, precision):
    num_seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return torch.empty_like(v, dtype=output_dtype), _state_or_empty(output_final_state, num_seqs, q, v)


@torch.library.custom_op("transnormer_hf::lightning_attn_bwd", mutates_args=(), device_types=("cuda", "cpu"))
def lightning_attn_bwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay_rates: torch.Tensor, scale: float,
    initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None, do: torch.Tensor,
    dht: torch.Tensor | None, precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: (dq, dk, dv, d initial_state fp32 or a 0-element tensor)."""
    return _lightning_attn_bwd(q, k, v, decay_rates, scale, initial_state, cu_seqlens, do, dht, precision)


@lightning_attn_bwd_op.register_fake
def _(q, k, v, decay_rates, scale, initial_state, cu_seqlens, do, dht, precision):
    num_seqs = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dh0 = _state_or_empty(initial_state is not None, num_seqs, q, v)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dh0


def _setup_context(ctx, inputs, output):
    q, k, v, decay_rates, scale, initial_state, output_final_state, cu_seqlens, output_dtype, precision = inputs
    ctx.save_for_backward(q, k, v, decay_rates, initial_state, cu_seqlens)
    ctx.scale, ctx.precision = scale, precision


def _backward(ctx, do, dht, backward_op=lightning_attn_bwd_op):
    q, k, v, decay_rates, initial_state, cu_seqlens = ctx.saved_tensors
    if dht is not None and dht.numel() == 0:  # the final state was not returned
        dht = None
    dq, dk, dv, dh0 = backward_op(q, k, v, decay_rates, ctx.scale, initial_state, cu_seqlens, do, dht, ctx.precision)
    return dq, dk, dv, None, None, (dh0 if initial_state is not None else None), None, None, None, None


lightning_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class LightningAttnFunction(torch.autograd.Function):
    """The eager path: the same launchers and autograd rule without torch.library's dispatch, which
    costs about 0.4 ms of host time per forward+backward (measured on CPU with launches stubbed)."""

    @staticmethod
    def forward(ctx, q, k, v, decay_rates, scale, initial_state, output_final_state, cu_seqlens, output_dtype,
                precision):
        inputs = (q, k, v, decay_rates, scale, initial_state, output_final_state, cu_seqlens, output_dtype, precision)
        _setup_context(ctx, inputs, None)
        return _lightning_attn_fwd(*inputs)

    @staticmethod
    def backward(ctx, do, dht):
        return _backward(ctx, do, dht, backward_op=_lightning_attn_bwd)


def lightning_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay_rates: torch.Tensor, *, scale: float = 1.0,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None, output_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton Lightning Attention; arguments and return value as `transnormer_hf.kernels.lightning_attn`."""
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    decay_rates = decay_rates.to(device=q.device, dtype=torch.float32).contiguous()
    if initial_state is not None:
        initial_state = initial_state.to(torch.float32)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
    # torch.compile traces the custom op (no graph break); eager code takes the cheaper Function.
    op = lightning_attn_fwd_op if torch.compiler.is_compiling() else LightningAttnFunction.apply
    o, final_state = op(q, k, v, decay_rates, float(scale), initial_state, output_final_state, cu_seqlens,
                        output_dtype or v.dtype, fp32_dot_precision())
    return o, (final_state if output_final_state else None)
