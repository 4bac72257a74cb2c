"""Fused SRMSNorm and gated SRMSNorm (TNL's `u * norm(o)`), forward and backward, in Triton.

The math is `srms_norm_ref` / `gated_srms_norm_ref` in reference.py: y = x * rstd with
rstd = rsqrt(mean(x^2) + eps) over the last dim (no weight), and, gated, y = gate * x * rstd. Statistics
and arithmetic are fp32; the output is stored once in the input dtype (the unfused torch path rounds the
norm's output before the gate multiplies it, so in bf16 the fused op is slightly closer to float64).

One program normalises one row, held whole in registers (rows up to `MAX_ROW_WIDTH` elements). The
forward saves only the fp32 rstd per row; the backward recomputes x * rstd from x:
    n = dy (plain) or dy * gate (gated);  dx = rstd * (n - x_hat * mean(n * x_hat));  dgate = dy * x_hat.

Both ops are `torch.library` operators with fake implementations inside an autograd.Function, so
`torch.compile(fullgraph=True)` traces through them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_device import on_device

Tensor = torch.Tensor

MAX_ROW_WIDTH = 16384  # one row lives in registers (16 warps, 32 fp32 a thread); TNL-7B is 4096 wide


@triton.jit
def _load_row(PTR, i_row, stride, o_n, m_n):
    """One row upcast to fp32 right after the load (also what the CPU interpreter needs for bf16)."""
    return tl.load(PTR + i_row * stride + o_n, mask=m_n, other=0.0).to(tl.float32)


@triton.jit
def _srms_norm_fwd_kernel(
    X, GATE, Y, RSTD,
    stride_x, stride_gate, stride_y,
    width, eps,
    HAS_GATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Y[row] = (GATE[row] *) X[row] * rstd; RSTD[row] = rsqrt(mean(X[row]^2) + eps), all in fp32."""
    i_row = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < width
    b_x = _load_row(X, i_row, stride_x, o_n, m_n)
    b_rstd = tl.rsqrt(tl.sum(b_x * b_x, axis=0) / width + eps)
    b_y = b_x * b_rstd
    if HAS_GATE:
        b_y *= _load_row(GATE, i_row, stride_gate, o_n, m_n)
    tl.store(Y + i_row * stride_y + o_n, b_y.to(Y.dtype.element_ty), mask=m_n)
    tl.store(RSTD + i_row, b_rstd)


@triton.jit
def _srms_norm_bwd_kernel(
    DY, X, GATE, RSTD, DX, DGATE,
    stride_dy, stride_x, stride_gate, stride_dx, stride_dgate,
    width,
    HAS_GATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """DX = rstd * (n - x_hat * mean(n * x_hat)) with n = DY (* GATE); DGATE = DY * x_hat."""
    i_row = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < width
    b_dy = _load_row(DY, i_row, stride_dy, o_n, m_n)
    b_x = _load_row(X, i_row, stride_x, o_n, m_n)
    b_rstd = tl.load(RSTD + i_row)
    b_x_hat = b_x * b_rstd
    b_n = b_dy
    if HAS_GATE:
        b_gate = _load_row(GATE, i_row, stride_gate, o_n, m_n)
        tl.store(DGATE + i_row * stride_dgate + o_n, (b_dy * b_x_hat).to(DGATE.dtype.element_ty), mask=m_n)
        b_n = b_dy * b_gate
    b_dx = b_rstd * (b_n - b_x_hat * (tl.sum(b_n * b_x_hat, axis=0) / width))
    tl.store(DX + i_row * stride_dx + o_n, b_dx.to(DX.dtype.element_ty), mask=m_n)


def _rows(x: Tensor) -> Tensor:
    """(..., width) -> (rows, width) with unit stride along width (a view whenever strides allow)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch_config(width: int) -> dict:
    block = triton.next_power_of_2(width)
    return {"BLOCK_N": block, "num_warps": min(16, max(1, block // 256))}


def _srms_norm_fwd(x: Tensor, gate: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """Launcher: (y in x's dtype, rstd fp32 of shape x.shape[:-1])."""
    width = x.shape[-1]
    x_rows = _rows(x)
    gate_rows = _rows(gate) if gate is not None else x_rows
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    y_rows = y.view(-1, width)
    if x_rows.shape[0] > 0:
        with on_device(x):
            _srms_norm_fwd_kernel[(x_rows.shape[0],)](
                x_rows, gate_rows, y_rows, rstd,
                x_rows.stride(0), gate_rows.stride(0), y_rows.stride(0),
                width, eps, HAS_GATE=gate is not None, **_launch_config(width),
            )
    return y, rstd


def _srms_norm_bwd(dy: Tensor, x: Tensor, gate: Tensor | None, rstd: Tensor) -> list[Tensor]:
    """Launcher: [dx] or, gated, [dx, dgate], each in its input's dtype."""
    width = x.shape[-1]
    dy_rows, x_rows = _rows(dy), _rows(x)
    gate_rows = _rows(gate) if gate is not None else x_rows
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if gate is not None else dx
    dx_rows, dgate_rows = dx.view(-1, width), dgate.view(-1, width)
    if x_rows.shape[0] > 0:
        with on_device(x):
            _srms_norm_bwd_kernel[(x_rows.shape[0],)](
                dy_rows, x_rows, gate_rows, rstd, dx_rows, dgate_rows,
                dy_rows.stride(0), x_rows.stride(0), gate_rows.stride(0), dx_rows.stride(0), dgate_rows.stride(0),
                width, HAS_GATE=gate is not None, **_launch_config(width),
            )
    return [dx, dgate] if gate is not None else [dx]


# The kernels enter torch as two plain operators (define/impl, cheaper per call than custom_op with
# register_autograd, pytorch#139500) with fake implementations for torch.compile; autograd lives in
# SRMSNormFunction around them, which Dynamo traces without a graph break.
torch.library.define("transnormer_hf::srms_norm_fwd", "(Tensor x, Tensor? gate, float eps) -> (Tensor, Tensor)")
torch.library.define("transnormer_hf::srms_norm_bwd", "(Tensor dy, Tensor x, Tensor? gate, Tensor rstd) -> Tensor[]")
torch.library.impl("transnormer_hf::srms_norm_fwd", "default", _srms_norm_fwd)
torch.library.impl("transnormer_hf::srms_norm_bwd", "default", _srms_norm_bwd)


@torch.library.register_fake("transnormer_hf::srms_norm_fwd")
def _(x: Tensor, gate: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("transnormer_hf::srms_norm_bwd")
def _(dy: Tensor, x: Tensor, gate: Tensor | None, rstd: Tensor) -> list[Tensor]:
    grads = [torch.empty_like(x, memory_format=torch.contiguous_format)]
    if gate is not None:
        grads.append(torch.empty_like(gate, memory_format=torch.contiguous_format))
    return grads


_srms_norm_fwd_op = torch.ops.transnormer_hf.srms_norm_fwd.default
_srms_norm_bwd_op = torch.ops.transnormer_hf.srms_norm_bwd.default


class SRMSNormFunction(torch.autograd.Function):
    """(gate *) srms_norm(x); saves x, gate and the fp32 rstd per row."""

    @staticmethod
    def forward(ctx, x: Tensor, gate: Tensor | None, eps: float) -> Tensor:
        y, rstd = _srms_norm_fwd_op(x, gate, eps)
        ctx.save_for_backward(x, gate, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, gate, rstd = ctx.saved_tensors
        grads = _srms_norm_bwd_op(dy, x, gate, rstd)
        return grads[0], (grads[1] if gate is not None else None), None


def _check_width(x: Tensor, name: str) -> None:
    if x.dim() == 0 or not 1 <= x.shape[-1] <= MAX_ROW_WIDTH:
        raise ValueError(
            f"{name} must have a last (normalised) dim of 1..{MAX_ROW_WIDTH} elements; got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point; got {x.dtype}")


def check_srms_norm_args(x: Tensor, gate: Tensor | None) -> None:
    """Raise a ValueError naming the argument when x (or the gate) cannot go through the kernels."""
    _check_width(x, "x")
    if gate is not None and (gate.shape != x.shape or gate.dtype != x.dtype):
        raise ValueError(
            f"gate must have x's shape and dtype {tuple(x.shape)} {x.dtype}; got {tuple(gate.shape)} {gate.dtype}"
        )


def srms_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """SRMSNorm over the last dim; see `srms_norm_ref`. x: (..., width) any float dtype; returns x's dtype."""
    check_srms_norm_args(x, None)
    return SRMSNormFunction.apply(x, None, float(eps))


def gated_srms_norm(x: Tensor, gate: Tensor, eps: float = 1e-6) -> Tensor:
    """gate * srms_norm(x) in one pass; see `gated_srms_norm_ref`. x, gate: (..., width), same shape and dtype."""
    check_srms_norm_args(x, gate)
    return SRMSNormFunction.apply(x, gate, float(eps))
