"""Lightning Attention, SRMSNorm and the chunked linear + cross-entropy loss for TransNormerLLM: torch
references plus Triton kernels.

This package imports only torch, triton and the standard library. The public ops dispatch once,
here: Triton for CUDA tensors when it is importable, otherwise the torch reference in
`reference.py` (the CPU path). `backend="torch"` or `"triton"` forces one; so does the environment
variable `TRANSNORMER_HF_BACKEND` (for debugging).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .context_parallel import (
    ContextParallelLayout,
    layout_from_cu_seqlens,
    lightning_attn_context_parallel,
    slice_lengths,
)
from .linear_cross_entropy import cross_entropy_rows_ref
from .linear_cross_entropy import linear_cross_entropy as _chunked_linear_cross_entropy
from .reference import (
    STEP_ACTIVATIONS,
    gated_srms_norm_ref,
    gemv_ref,
    lightning_attn_chunk_ref,
    lightning_attn_parallel_ref,
    lightning_attn_recurrent_ref,
    lightning_attn_step_fused_ref,
    srms_norm_ref,
    validate_lightning_attn_args,
)

__all__ = [
    "BACKENDS",
    "ContextParallelLayout",
    "layout_from_cu_seqlens",
    "slice_lengths",
    "gated_srms_norm",
    "gemv",
    "GEMV_MAX_ROWS",
    "lightning_attn",
    "lightning_attn_step",
    "lightning_attn_step_fused",
    "STEP_ACTIVATIONS",
    "linear_cross_entropy",
    "srms_norm",
    "resolve_backend",
    "triton_unavailable_reason",
    "lightning_attn_chunk_ref",
    "lightning_attn_parallel_ref",
    "lightning_attn_recurrent_ref",
    "lightning_attn_step_fused_ref",
    "srms_norm_ref",
    "gated_srms_norm_ref",
    "gemv_ref",
    "cross_entropy_rows_ref",
]

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "TRANSNORMER_HF_BACKEND"


_TRITON_MODULES: dict[str, object] = {}
_TRITON_IMPORT_ERRORS: dict[str, str] = {}


_TRITON_MODULE_NAMES = ("triton_lightning_attn", "triton_srms_norm", "triton_decode", "triton_gemv",
                        "triton_cross_entropy")


@torch.compiler.assume_constant_result
def _import_triton_modules() -> bool:
    # torch.compile cannot trace importlib; this runs eagerly at trace time, so dispatch stays in one graph. All
    # modules are imported at once: a traced graph sees these dicts as they were at its first read, so a module
    # imported later in the same trace (the decode kernel, first used by a compiled step after an eager prefill)
    # would look missing.
    if not _TRITON_MODULES and not _TRITON_IMPORT_ERRORS:
        for name in _TRITON_MODULE_NAMES:
            try:
                _TRITON_MODULES[name] = importlib.import_module(f"{__name__}.{name}")
            except ImportError as error:  # triton missing (macOS, CPU-only installs)
                _TRITON_IMPORT_ERRORS[name] = f"importing {name} failed: {error}"
    return True


def _triton_module(name: str):
    """The Triton kernel module `name` of this package (all are imported on first use); None (reason kept) on failure."""
    _import_triton_modules()
    return _TRITON_MODULES.get(name)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)  # subclasses (fake, functional, DTensor) take the ops


def _traced(*tensors: torch.Tensor) -> bool:
    """True while a graph is being traced (torch.compile, torch.export, make_fx, FakeTensor or functionalization):
    the kernels then enter as `torch.library` operators, whose fake implementations the tracer needs. An eager
    call skips that dispatch and calls the launcher itself: the operator dispatch cost ~160-280 us of host time
    per call on an H200 host, against 1-3 us of kernel time for one decode token (issue 17)."""
    return (torch.compiler.is_compiling() or is_in_torch_dispatch_mode()
            or any(type(t) not in _PLAIN_TENSOR_TYPES for t in tensors))


def triton_unavailable_reason(device: torch.device, module: str = "triton_lightning_attn") -> str | None:
    """Why the Triton kernels of `module` cannot run on `device`, or None when they can."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not (interpreting and device.type == "cpu"):
        return f"the Triton kernels need CUDA tensors; these are on {device.type}"
    if _triton_module(module) is None:
        return _TRITON_IMPORT_ERRORS[module]
    return None


def resolve_backend(backend: str, device: torch.device, module: str = "triton_lightning_attn") -> str:
    """Turn "auto" | "torch" | "triton" (or the environment override) into the backend that will run.

    "auto" picks Triton only for CUDA tensors (under TRITON_INTERPRET=1, CPU tensors need "triton" explicitly).
    """
    backend = os.environ.get(BACKEND_ENV, backend) if backend == "auto" else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto" and device.type != "cuda":
        return "torch"
    reason = triton_unavailable_reason(device, module)
    if backend == "triton" and reason is not None:
        raise RuntimeError(f"backend='triton' was requested but {reason}")
    if backend == "auto":
        return "torch" if reason is not None else "triton"
    return backend


def lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_rates: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    output_dtype: torch.dtype | None = None,
    backend: str = "auto",
    context_parallel: ContextParallelLayout | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention with per-head decay exp(-decay_rates); see `reference.py` for the math.

    Args:
        q, k: (B, N, H, d_k). v: (B, N, H, d_v). Any float dtype; accumulation is fp32.
        decay_rates: (H,) float, >= 0; the per-step decay is exp(-rate).
        scale: multiplies q (TNL uses 1.0: no 1/sqrt(d) scaling).
        initial_state: (B, H, d_k, d_v), or (number of sequences, ...) with `cu_seqlens`; fp32.
        output_final_state: also return the final state, fp32.
        cu_seqlens: int (S + 1,) boundaries of S sequences packed in a B == 1 batch; the state resets at each.
        output_dtype: dtype of o (default v's). There is no softmax denominator, so o grows with the sequence
            (past fp16's 65504 on long inputs): fp16 models take it in torch.float32.
        backend: "auto" (Triton on CUDA, torch otherwise), "torch" or "triton".
        context_parallel: the sequence is split across this layout's process group and q, k, v, cu_seqlens are
            this rank's slice (see `context_parallel.py`); the final state is then the whole sequence's.

    Returns:
        (o of shape (B, N, H, d_v) in `output_dtype`, final state or None).
    """
    validate_lightning_attn_args(q, k, v, decay_rates, initial_state, cu_seqlens)
    if context_parallel is not None and context_parallel.world_size > 1:
        local_op = functools.partial(lightning_attn, backend=backend)
        return lightning_attn_context_parallel(
            q, k, v, decay_rates, context_parallel, local_op, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        )
    if resolve_backend(backend, q.device) == "triton":
        return _triton_module("triton_lightning_attn").lightning_attn(
            q, k, v, decay_rates, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens, output_dtype=output_dtype,
        )
    return lightning_attn_chunk_ref(
        q, k, v, decay_rates, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, output_dtype=output_dtype,
    )


def lightning_attn_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_rates: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: S <- lambda S + k^T v; o = scale q S. q, k (B, 1, H, d_k); v (B, 1, H, d_v).

    Returns (o of shape (B, 1, H, d_v), the new fp32 state (B, H, d_k, d_v)).
    """
    if q.shape[1] != 1:
        raise ValueError(f"lightning_attn_step takes one token (N == 1); got q of shape {tuple(q.shape)}")
    validate_lightning_attn_args(q, k, v, decay_rates, state, None)
    if resolve_backend(backend, q.device, "triton_decode") == "triton":
        decode = _triton_module("triton_decode")
        if not _traced(q, k, v, decay_rates, state) and state.dtype == torch.float32:
            return decode._lightning_attn_step(q, k, v, decay_rates, state, float(scale))
        return decode.lightning_attn_step(q, k, v, decay_rates, state, scale=scale)
    return lightning_attn_recurrent_ref(
        q, k, v, decay_rates, scale=scale, initial_state=state, output_final_state=True
    )


def _srms_norm_triton(x: torch.Tensor, gate: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The Triton (gated) SRMSNorm: the launcher itself for an eager call that autograd does not record (decoding,
    evaluation); the autograd.Function over the operators otherwise (training, tracing)."""
    norm = _triton_module("triton_srms_norm")
    tensors = (x,) if gate is None else (x, gate)
    recorded = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if recorded or _traced(*tensors):
        return norm.srms_norm(x, eps) if gate is None else norm.gated_srms_norm(x, gate, eps)
    norm.check_srms_norm_args(x, gate)
    return norm._srms_norm_fwd(x, gate, float(eps))[0]


def lightning_attn_step_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_rates: torch.Tensor,
    state: torch.Tensor,
    *,
    activation: str,
    theta: torch.Tensor | None = None,
    position: torch.Tensor | None = None,
    scale: float = 1.0,
    out_state: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step from the raw q, k projections: feature map, LRPE rotation and `lightning_attn_step` in one
    kernel on Triton; the math is `lightning_attn_step_fused_ref`.

    Args:
        q, k: (B, 1, H, D) before the feature map. v: (B, 1, H, d_v).
        decay_rates: (H,) float. state: (B, H, d_k, d_v) fp32 with d_k = 2 D with LRPE, else D.
        activation: the feature map, a key of `STEP_ACTIVATIONS`.
        theta, position: LRPE's (H, D) (or (H, 1, D)) angles and the token's absolute position, int (1,) on q's
            device (a tensor, so a captured CUDA graph replays at every position); both or neither.
        out_state: where the new state goes (may be `state`: in place); a fresh tensor when None.

    Returns:
        (o (B, 1, H, d_v) in v's dtype, the new fp32 state: `out_state` when given).
    """
    if activation not in STEP_ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(STEP_ACTIVATIONS)}; got {activation!r}")
    if q.dim() != 4 or q.shape[1] != 1:
        raise ValueError(f"lightning_attn_step_fused takes one token, q of shape (B, 1, H, D); got {tuple(q.shape)}")
    if (theta is None) != (position is None):
        raise ValueError("pass LRPE's theta and position together, or neither")
    batch, _, heads, head_dim = q.shape
    key_dim = 2 * head_dim if theta is not None else head_dim
    if theta is not None and (theta.numel() != heads * head_dim or position.numel() != 1):
        raise ValueError(f"theta must hold (H, D) = ({heads}, {head_dim}) angles and position one int; got theta "
                         f"{tuple(theta.shape)}, position {tuple(position.shape)}")
    expected = (batch, heads, key_dim, v.shape[-1])
    if state.shape != expected or state.dtype != torch.float32:
        raise ValueError(f"state must be float32 of shape {expected}; got {tuple(state.shape)} {state.dtype}")
    if out_state is not None and (out_state.shape != expected or out_state.dtype != torch.float32):
        raise ValueError(f"out_state must be float32 of shape {expected}; got {tuple(out_state.shape)} {out_state.dtype}")
    validate_lightning_attn_args(q, k, v, decay_rates, None, None)
    if resolve_backend(backend, q.device, "triton_decode") == "triton":
        decode = _triton_module("triton_decode")
        tensors = [t for t in (q, k, v, decay_rates, state, theta, position, out_state) if t is not None]
        if not _traced(*tensors) and (out_state is None or out_state.is_contiguous()):
            return decode._lightning_attn_step_fused(q, k, v, decay_rates, state, theta, position, activation,
                                                     float(scale), out_state)
        out, new_state = decode.lightning_attn_step_fused_op(q, k, v, decay_rates, state, theta, position,
                                                             activation, float(scale))
    else:
        out, new_state = lightning_attn_step_fused_ref(q, k, v, decay_rates, state, activation=activation,
                                                       theta=theta, position=position, scale=scale)
    if out_state is None:
        return out, new_state
    return out, out_state.copy_(new_state)


def srms_norm(x: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """Simple RMSNorm (no weight) over the last dim, statistics in fp32, output in x's dtype."""
    if resolve_backend(backend, x.device, "triton_srms_norm") == "triton":
        return _srms_norm_triton(x, None, eps)
    return srms_norm_ref(x, eps)


def gated_srms_norm(x: torch.Tensor, gate: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """gate * srms_norm(x): TNL's attention output `u * norm(o)` (no sigmoid on the gate), fused on Triton.

    x, gate: (..., width) of the same shape and dtype; returns that dtype.
    """
    if gate.shape != x.shape:
        raise ValueError(f"gate must have x's shape {tuple(x.shape)}; got {tuple(gate.shape)}")
    if resolve_backend(backend, x.device, "triton_srms_norm") == "triton":
        return _srms_norm_triton(x, gate, eps)
    return gated_srms_norm_ref(x, gate, eps)


GEMV_MAX_ROWS = 16  # rows the Triton GEMV takes in one launch (its tensor-core tile's height); more go to cuBLAS


def gemv(x: torch.Tensor, weight: torch.Tensor, gate_weight: torch.Tensor | None = None, *,
         residual: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """x @ weight^T over x's last dimension, times x @ gate_weight^T when given (the SGLU gate), plus `residual`
    (x's leading shape by N) when given; math `gemv_ref`.

    The Triton GEMV (the products and the residual in one pass, rounded once) runs for at most GEMV_MAX_ROWS rows of
    16-bit x with weights and residual of x's dtype, contiguous, in an eager call that autograd does not record and
    autocast does not touch: a decoding step. Anything else (training, tracing, fp32, big batches) takes `gemv_ref`,
    i.e. cuBLAS."""
    if x.shape[-1] != weight.shape[-1] or (gate_weight is not None and gate_weight.shape != weight.shape):
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must match weight's (N, K) = {tuple(weight.shape)}"
                         + ("" if gate_weight is None else f" and gate_weight's {tuple(gate_weight.shape)}"))
    out_shape = (*x.shape[:-1], weight.shape[0])
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"residual must have the output's shape {out_shape} (x's leading dimensions by weight's N); "
                         f"got {tuple(residual.shape)}")
    operands = (x, weight) + tuple(t for t in (gate_weight, residual) if t is not None)
    rows = x.numel() // max(x.shape[-1], 1)
    takes_kernel = (
        0 < rows <= GEMV_MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16) and x.stride(-1) == 1
        and all(t.dtype == x.dtype and t.device == x.device and t.is_contiguous() for t in operands[1:])
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in operands))
        and not torch.is_autocast_enabled(x.device.type) and not _traced(*operands)
    )
    if takes_kernel and resolve_backend(backend, x.device, "triton_gemv") == "triton":
        out = _triton_module("triton_gemv").gemv(
            x.reshape(rows, x.shape[-1]), weight, gate_weight,
            None if residual is None else residual.view(rows, weight.shape[0]))
        return out.view(out_shape)
    return gemv_ref(x, weight, gate_weight, residual)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of hidden @ weight.T against labels without the (T, V) logits, `chunk_size` rows at a time.

    hidden (T, D), weight (V, D), labels (T,) already shifted; the mean over non-ignored labels, or the sum
    divided by `num_items_in_batch`. Each chunk's loss and softmax gradient run in one Triton pass on CUDA
    (float64 always takes the torch path). Arguments as in `linear_cross_entropy.linear_cross_entropy`.
    """
    rows_fn = cross_entropy_rows_ref
    if hidden.dtype != torch.float64 and resolve_backend(backend, hidden.device, "triton_cross_entropy") == "triton":
        rows_fn = _triton_module("triton_cross_entropy").cross_entropy_rows
    return _chunked_linear_cross_entropy(
        hidden, weight, labels, chunk_size=chunk_size, ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch, rows_fn=rows_fn,
    )


def _hand_over_to_the_hub_package() -> None:
    """Load the Hugging Face `kernels` package, where installed, in place of this folder imported under that name.

    Python puts the working directory on sys.path for `python -m ...` and `python -c`; run from a checkout's root,
    `import kernels` (which transformers >= 5.25 does on import) then finds this folder instead of that package.
    An import returns what sys.modules holds once the module's code has run, so replacing the entry hands over.
    Without that package this folder stays what Python found (transformers sees a `kernels` of no version and
    leaves it alone)."""
    import importlib.machinery
    import importlib.util
    import sys

    checkout = os.path.realpath(os.path.dirname(os.path.dirname(__file__)))
    search = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != checkout]
    spec = importlib.machinery.PathFinder.find_spec("kernels", search)
    if spec is None:
        return
    for name in [name for name in sys.modules if name.startswith("kernels.")]:
        del sys.modules[name]  # this folder's modules, imported above under the borrowed name
    package = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = package
    spec.loader.exec_module(package)


if __name__ == "kernels":
    _hand_over_to_the_hub_package()
