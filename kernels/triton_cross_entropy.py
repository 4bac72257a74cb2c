"""Fused cross-entropy rows in Triton: per-row loss and, in place, the gradient softmax - onehot.

The math is `cross_entropy_rows_ref` in linear_cross_entropy.py: for one row x of logits (fp32 after the
load) and its label y, loss = logsumexp(x) - x[y]; its gradient with respect to x is softmax(x) - onehot(y);
rows labelled `ignore_index` have loss 0 and gradient 0. The torch twin makes about six passes over the
(chunk, vocabulary) logits (upcast, logsumexp, subtract, exp, onehot, mask, downcast: ~38 bytes per element in
bf16); this kernel reads the row twice and writes it once (6 bytes), which a profile of TNL-1B training at
8K context put at ~8% of the step.

One program per row: a first sweep keeps a running max and a rescaled running sum per lane (online
logsumexp), a second writes the gradient over the logits, in their dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_device import on_device

Tensor = torch.Tensor


@triton.jit
def _cross_entropy_rows_kernel(
    LOGITS, LABELS, LOSS,
    stride_row, vocab_size, ignore_index,
    WANT_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """LOSS[row] = logsumexp(LOGITS[row]) - LOGITS[row, label]; with WANT_GRAD, LOGITS[row] <- softmax - onehot."""
    i_row = tl.program_id(0).to(tl.int64)
    row = LOGITS + i_row * stride_row
    o_v = tl.arange(0, BLOCK_V)
    label = tl.load(LABELS + i_row)
    valid = label != ignore_index
    target = tl.where(valid, label, 0)

    # The running max starts far below any logit but finite, so no lane ever computes -inf - -inf.
    running_max = tl.full([BLOCK_V], -1.0e30, tl.float32)
    running_sum = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, vocab_size, BLOCK_V):
        m_v = start + o_v < vocab_size
        b_x = tl.load(row + start + o_v, mask=m_v, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, b_x)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.exp(b_x - new_max)
        running_max = new_max
    row_max = tl.max(running_max, axis=0)
    log_normaliser = row_max + tl.log(tl.sum(running_sum * tl.exp(running_max - row_max), axis=0))
    target_logit = tl.load(row + target).to(tl.float32)
    tl.store(LOSS + i_row, tl.where(valid, log_normaliser - target_logit, 0.0))

    if WANT_GRAD:
        keep = tl.where(valid, 1.0, 0.0)
        for start in range(0, vocab_size, BLOCK_V):
            m_v = start + o_v < vocab_size
            b_x = tl.load(row + start + o_v, mask=m_v, other=0.0).to(tl.float32)
            b_grad = (tl.exp(b_x - log_normaliser) - tl.where(start + o_v == target, 1.0, 0.0)) * keep
            tl.store(row + start + o_v, b_grad.to(LOGITS.dtype.element_ty), mask=m_v)


def _cross_entropy_rows_(logits: Tensor, labels: Tensor, ignore_index: int, want_grad: bool) -> Tensor:
    """Launcher: fp32 row losses; with `want_grad` the logits (rows, V) are overwritten by their gradient."""
    rows, vocab_size = logits.shape
    row_loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows > 0:
        block = min(4096, triton.next_power_of_2(vocab_size))
        with on_device(logits):
            _cross_entropy_rows_kernel[(rows,)](
                logits, labels, row_loss, logits.stride(0), vocab_size, ignore_index,
                WANT_GRAD=want_grad, BLOCK_V=block, num_warps=8 if block >= 2048 else 4,
            )
    return row_loss


# A plain operator that mutates the logits, with a fake implementation: torch.compile traces it as one node.
torch.library.define(
    "transnormer_hf::cross_entropy_rows_",
    "(Tensor(a!) logits, Tensor labels, int ignore_index, bool want_grad) -> Tensor",
)
torch.library.impl("transnormer_hf::cross_entropy_rows_", "default", _cross_entropy_rows_)


@torch.library.register_fake("transnormer_hf::cross_entropy_rows_")
def _(logits: Tensor, labels: Tensor, ignore_index: int, want_grad: bool) -> Tensor:
    return logits.new_empty(logits.shape[:1], dtype=torch.float32)


def cross_entropy_rows(logits: Tensor, labels: Tensor, ignore_index: int, want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """As `cross_entropy_rows_ref`: (row losses fp32, gradient in the logits' dtype or None); reuses `logits`."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    row_loss = torch.ops.transnormer_hf.cross_entropy_rows_(logits, labels.contiguous(), ignore_index, want_grad)
    return row_loss, (logits if want_grad else None)
