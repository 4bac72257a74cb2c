"""Products x W^T of a few rows (decoding), in Triton: y = x W^T or the SGLU gate (x W^T) * (x G^T), plus a residual.

While decoding, every linear layer is a matrix-vector product (GEMV): a handful of rows meet a (N, K) weight that
is read once per token, so the layer is bound by the weight's bytes. cuBLAS reaches a third to three quarters of the
H200's copy bandwidth on TNL-1B's 8-33 MB weights; most of the rest is each kernel's start and tail. This kernel gives
each program BLOCK_N weight rows, walks K in BLOCK_K slices with a deep load pipeline and multiplies the rows of x
(zero-padded to 16, the smallest tensor-core tile) on the tensor cores, accumulating in fp32. The gated variant
reads the SGLU's two weights in one pass and multiplies the two products before rounding once, which also
saves the elementwise kernel between them; a residual (the decoder layer's skip connection) is added the same way,
saving the elementwise add after out_proj and l3. Launch settings were measured on an H200 (`benchmarks/gemv.py`,
benchmarks/results/gemv_h200.json): narrow row blocks for 2048-row weights (more programs), wide ones for the rest.
The gain over cuBLAS is 2-10% per product (lm_head reaches the copy bandwidth); the small weights stay bound by
each kernel's start and tail.

The math is `reference.gemv_ref`; `kernels.gemv` decides when this kernel runs (16-bit, few rows, eager).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .triton_device import on_device, shared_memory_limit

Tensor = torch.Tensor
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _load_rows(base, o_r, m_r, row_stride, o_k, k, EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
    """Rows o_r (masked by m_r), columns o_k of a row-major matrix; no column mask when K divides evenly."""
    pointers = base + o_r[:, None].to(tl.int64) * row_stride + o_k[None, :]
    if EVEN_K:
        tile = tl.load(pointers, mask=m_r[:, None], other=0.0)
    else:
        tile = tl.load(pointers, mask=m_r[:, None] & (o_k < k)[None, :], other=0.0)
    if UPCAST:  # the interpreter's bf16 arithmetic is wrong; fp32 there
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _gemv_kernel(
    X, W, G, R, Y, rows, n, k, stride_x, stride_r, stride_y,
    GATED: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
):
    """Y[:, n-block] = X W[n-block]^T (times X G[n-block]^T when GATED, plus R[:, n-block] when HAS_RESIDUAL);
    W and G are (n, k) row-major."""
    o_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_m = tl.arange(0, 16)
    m_n = o_n < n
    m_m = o_m < rows
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    acc_gate = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        b_x = _load_rows(X, o_m, m_m, stride_x, o_k, k, EVEN_K, UPCAST)
        acc = tl.dot(b_x, tl.trans(_load_rows(W, o_n, m_n, k, o_k, k, EVEN_K, UPCAST)), acc)
        if GATED:
            acc_gate = tl.dot(b_x, tl.trans(_load_rows(G, o_n, m_n, k, o_k, k, EVEN_K, UPCAST)), acc_gate)
    if GATED:
        acc = acc * acc_gate
    m_y = m_m[:, None] & m_n[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(R + o_m[:, None] * stride_r + o_n[None, :], mask=m_y, other=0.0).to(tl.float32)
    tl.store(Y + o_m[:, None] * stride_y + o_n[None, :], acc.to(Y.dtype.element_ty), mask=m_y)


@functools.lru_cache(maxsize=None)
def _launch_config(n: int, k: int, gated: bool, itemsize: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages), with the pipeline made shallower until it fits shared memory.

    H200, bf16 (gemv_h200.json): 2048-row weights ran best with 16-row blocks and 512-wide K slices (128 programs
    instead of 32), wider weights with 64 x 256 tiles; 4 warps and 3-4 stages throughout. The gated variant loads
    two weight tiles per slice, so it takes 128-wide slices (TNL-1B's l1 * l2: 13.4 us against 16.0 with 32 x 256)."""
    block_n, block_k = (16, 512) if n <= 4096 else ((64, 128) if gated else (64, 256))
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    limit = shared_memory_limit(device)
    num_stages = 4
    while num_stages > 1 and num_stages * block_k * itemsize * (16 + (2 if gated else 1) * block_n) > limit:
        num_stages -= 1
    return block_n, block_k, 4, num_stages


def gemv(x: Tensor, weight: Tensor, gate_weight: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """x (rows, K) @ weight (N, K)^T, times x @ gate_weight^T when given, plus residual (rows, N) when given, in x's
    dtype with fp32 accumulation and one rounding.

    At most 16 rows (one tensor-core tile); x's last dimension, the weights and the residual's rows contiguous
    (`kernels.gemv` checks)."""
    rows, k = x.shape
    n = weight.shape[0]
    y = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    itemsize = 4 if _INTERPRET else x.element_size()
    block_n, block_k, num_warps, num_stages = _launch_config(n, k, gate_weight is not None, itemsize, x.device)
    with on_device(x):
        _gemv_kernel[(triton.cdiv(n, block_n),)](
            x, weight, gate_weight if gate_weight is not None else weight, residual if residual is not None else y, y,
            rows, n, k, x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
            GATED=gate_weight is not None, HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, BLOCK_K=block_k,
            EVEN_K=k % block_k == 0, UPCAST=_INTERPRET, num_warps=num_warps, num_stages=num_stages,
        )
    return y
