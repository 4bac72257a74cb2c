"""Chunked linear + cross-entropy: the causal-LM loss from the final hidden states, without the (T, V) logits.

The op computes F.cross_entropy(hidden @ weight.T, labels, reduction="sum") / denominator, which is transformers'
`ForCausalLMLoss` on labels that are already shifted; that expression is its readable twin (the tests compare the two
in float64). Rows go through in chunks: each chunk's logits live only while its loss and the gradient of the summed
loss (softmax - onehot) are computed, so the gradients of hidden and weight are built during the forward and backward
only scales them by the incoming gradient. Memory beyond the inputs: one chunk of fp32 logits, a (T, D) gradient
for hidden and a (V, D) fp32 accumulator for weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def cross_entropy_rows_ref(
    logits: Tensor, labels: Tensor, ignore_index: int, want_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """Per-row loss logsumexp(x) - x[label] (fp32, 0 on ignored rows) and, when asked, its gradient with respect to
    the logits, softmax - onehot (0 on ignored rows), in the logits' dtype. May reuse the logits' storage."""
    input_dtype = logits.dtype
    # Upcast as ForCausalLMLoss does: the bf16 rounding of the logits is the unfused head's.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = labels != ignore_index
    targets = torch.where(valid, labels, 0)
    log_normaliser = torch.logsumexp(logits, dim=-1)  # (C,)
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    row_loss = torch.where(valid, log_normaliser - target_logits, 0)
    if not want_grad:
        return row_loss, None
    grad_logits = logits.sub_(log_normaliser[:, None]).exp_()  # softmax, built in place in the fp32 buffer
    grad_logits[torch.arange(len(targets), device=targets.device), targets] -= 1
    return row_loss, grad_logits.mul_(valid[:, None]).to(input_dtype)


def _linear_cross_entropy_fwd(
    hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int, ignore_index: int,
    need_hidden_grad: bool, need_weight_grad: bool, rows_fn,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The summed loss over non-ignored rows and, where asked, its gradients for hidden and weight (unscaled)."""
    accumulate_dtype = torch.promote_types(hidden.dtype, torch.float32)
    loss_sum = torch.zeros((), dtype=accumulate_dtype, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
    grad_weight = torch.zeros_like(weight, dtype=accumulate_dtype) if need_weight_grad else None
    want_grad = need_hidden_grad or need_weight_grad
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        hidden_chunk = hidden[rows]
        # Logits in the input dtype, as nn.Linear (and autocast) computes them.
        row_loss, grad_logits = rows_fn(hidden_chunk @ weight.T, labels[rows], ignore_index, want_grad)
        loss_sum += row_loss.sum()
        if grad_logits is None:
            continue
        # grad_logits is in the logits' dtype (bf16 under autocast); the products below cast as autocast does.
        if grad_hidden is not None:
            grad_hidden[rows] = grad_logits @ weight
        if grad_weight is not None:
            grad_weight += grad_logits.T @ hidden_chunk
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return loss_sum, grad_hidden, grad_weight


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Summed cross-entropy of hidden @ weight.T; the gradients come from the forward, backward scales them."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int, ignore_index: int,
                need_hidden_grad: bool, need_weight_grad: bool, rows_fn) -> Tensor:
        loss_sum, grad_hidden, grad_weight = _linear_cross_entropy_fwd(
            hidden, weight, labels, chunk_size, ignore_index, need_hidden_grad, need_weight_grad, rows_fn
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss_sum

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = None if grad_hidden is None else grad_hidden * grad_output
        grad_weight = None if grad_weight is None else grad_weight * grad_output
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _validate(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int, num_items_in_batch: object) -> None:
    if hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a 2-D float tensor (T, D); got {tuple(hidden.shape)} {hidden.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be (V, D) with hidden's D = {hidden.shape[1]}; got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight and hidden must share a dtype; got weight {weight.dtype} and hidden {hidden.dtype}")
    if labels.shape != hidden.shape[:1] or labels.dtype != torch.long:
        raise ValueError(
            f"labels must be an int64 tensor of shape (T,) = ({hidden.shape[0]},); "
            f"got {tuple(labels.shape)} {labels.dtype}"
        )
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}")
    if num_items_in_batch is not None and not isinstance(num_items_in_batch, (int, Tensor)):
        raise ValueError(f"num_items_in_batch must be an int, a tensor or None; got {num_items_in_batch!r}")


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_size: int,
    ignore_index: int = -100,
    num_items_in_batch: int | Tensor | None = None,
    rows_fn: Callable = cross_entropy_rows_ref,
) -> Tensor:
    """Cross-entropy of the logits hidden @ weight.T against labels, `chunk_size` rows at a time.

    Args:
        hidden: (T, D) final hidden states, labels already aligned (shifted) to them.
        weight: (V, D) output projection (the lm_head weight), hidden's dtype.
        labels: (T,) int64 class indices; rows labelled `ignore_index` count for nothing.
        chunk_size: rows per chunk; bounds the fp32 logits alive at once to (chunk_size, V).
        num_items_in_batch: divide the summed loss by this (gradient accumulation); None means the number of
            non-ignored labels, i.e. the mean (nan, with zero gradients, when every label is ignored, as in
            F.cross_entropy).
        rows_fn: the per-chunk loss and gradient, `cross_entropy_rows_ref` or its Triton twin (the package's
            `linear_cross_entropy` picks it from its `backend`).

    Returns:
        The scalar loss in fp32 (float64 for float64 inputs).
    """
    _validate(hidden, weight, labels, chunk_size, num_items_in_batch)
    grad_enabled = torch.is_grad_enabled()
    loss_sum = LinearCrossEntropyFunction.apply(
        hidden, weight, labels, chunk_size, ignore_index,
        grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad, rows_fn,
    )
    if num_items_in_batch is None:  # the mean; nan with zero gradients when every label is ignored, as F.cross_entropy
        count = (labels != ignore_index).sum()
        return torch.where(count > 0, loss_sum / count.clamp_min(1), torch.nan)
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(loss_sum.device)
    return loss_sum / num_items_in_batch
