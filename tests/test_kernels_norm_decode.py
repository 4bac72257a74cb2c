"""Triton SRMSNorm, gated SRMSNorm and the decode step (backend="triton", CPU interpreter) vs float64 torch."""

import pytest
import torch
from checks import assert_close_to_ref

from transnormer_hf.kernels import (
    gated_srms_norm,
    gated_srms_norm_ref,
    lightning_attn_chunk_ref,
    lightning_attn_recurrent_ref,
    lightning_attn_step,
    srms_norm,
    srms_norm_ref,
)

EPS = 1e-6


def _leaf_copies(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def _like_interpreter_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 by truncation: the interpreter's cast on store (the GPU rounds to nearest, half the error)."""
    return (x.float().contiguous().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _baseline(fp32_result: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """None for fp32 (compare with rtol); for bf16 the fp32 twin stored like the kernel stores bf16."""
    return None if dtype == torch.float32 else _like_interpreter_bf16(fp32_result)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("shape", [(2, 5, 48), (3, 129)], ids=["B2-N5-W48", "N3-W129"])
def test_norm_forward_backward_vs_float64(gated, dtype, shape):
    x = (torch.randn(shape) * 3.0).to(dtype)
    inputs = [x]
    if gated:  # a strided view like the model's `u` (row stride 2 * width)
        inputs.append(torch.randn(*shape[:-1], 2 * shape[-1]).to(dtype)[..., shape[-1]:])
    grad = torch.randn(shape).to(dtype)
    if gated:
        op, ref = (lambda x, g: gated_srms_norm(x, g, EPS, backend="triton")), (lambda x, g: gated_srms_norm_ref(x, g, EPS))
    else:
        op, ref = (lambda x: srms_norm(x, EPS, backend="triton")), (lambda x: srms_norm_ref(x, EPS))

    kernel_in, truth_in, base_in = _leaf_copies(inputs), _leaf_copies(inputs, torch.float64), _leaf_copies(inputs, torch.float32)
    out, truth, base = op(*kernel_in), ref(*truth_in), ref(*base_in)  # base: the twin on the same (upcast) values
    assert out.dtype == dtype and out.shape == x.shape
    grads = torch.autograd.grad(out, kernel_in, grad)
    grads64 = torch.autograd.grad(truth, truth_in, grad.double())
    grads_base = torch.autograd.grad(base, base_in, grad.float())
    assert_close_to_ref("y", out, truth, _baseline(base, dtype), rtol=2e-6)
    for name, got, want, got_base in zip(("dx", "dgate"), grads, grads64, grads_base):
        assert got.dtype == dtype and got.shape == x.shape
        assert_close_to_ref(name, got, want, _baseline(got_base, dtype), rtol=2e-6)


def test_gated_norm_is_gate_times_norm_in_fp32():
    x, gate = torch.randn(4, 7, 64), torch.randn(4, 7, 64)
    torch.testing.assert_close(gated_srms_norm(x, gate, EPS, backend="triton"), gate * srms_norm_ref(x, EPS))


def test_norm_custom_ops_trace_with_fullgraph_compile():
    def layer_tail(o, u):
        return (gated_srms_norm(o, u, EPS, backend="triton") * srms_norm(o, EPS, backend="triton")).sum()

    o, u = torch.randn(2, 3, 32, requires_grad=True), torch.randn(2, 3, 32, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer_tail, fullgraph=True, backend="aot_eager")  # traces fakes and the autograd formula
    grads = torch.autograd.grad(compiled(o, u), (o, u))
    grads_eager = torch.autograd.grad(layer_tail(o, u), (o, u))
    for got, want in zip(grads, grads_eager):
        torch.testing.assert_close(got, want)


def test_norm_bad_input_errors():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="gate must have x's shape"):
        gated_srms_norm(x, torch.randn(2, 9), backend="triton")
    with pytest.raises(ValueError, match="gate must have x's shape and dtype"):
        gated_srms_norm(x, torch.randn(2, 8, dtype=torch.float64), backend="triton")
    with pytest.raises(ValueError, match="last \\(normalised\\) dim"):
        srms_norm(torch.randn(()), backend="triton")
    with pytest.raises(ValueError, match="1..16384"):
        srms_norm(torch.randn(1, 16385), backend="triton")
    with pytest.raises(ValueError, match="floating point"):
        srms_norm(torch.ones(2, 8, dtype=torch.int32), backend="triton")


def _decode_inputs(batch, heads, key_dim, value_dim, dtype=torch.float32):
    q, k = (torch.randn(batch, 1, heads, key_dim).to(dtype) for _ in range(2))
    v = torch.randn(batch, 1, heads, value_dim).to(dtype)
    return q, k, v


@pytest.mark.parametrize(
    "batch,heads,key_dim,value_dim,dtype",
    [(2, 3, 32, 16, torch.float32), (1, 2, 64, 32, torch.float32), (3, 2, 24, 20, torch.bfloat16)],
    ids=["B2-H3-K32-V16-fp32", "B1-H2-K64-V32-lrpe-fp32", "B3-H2-K24-V20-bf16"],
)
def test_decode_step_vs_recurrent_float64(batch, heads, key_dim, value_dim, dtype):
    q, k, v = _decode_inputs(batch, heads, key_dim, value_dim, dtype)
    rates = torch.tensor([1e-5, 0.3, 4.0][:heads])
    state = torch.randn(batch, heads, key_dim, value_dim)
    state_before = state.clone()
    out, new_state = lightning_attn_step(q, k, v, rates, state, scale=0.7, backend="triton")
    truth, truth_state = lightning_attn_recurrent_ref(
        q.double(), k.double(), v.double(), rates, scale=0.7, initial_state=state.double(), output_final_state=True
    )
    base, _ = lightning_attn_recurrent_ref(
        q.float(), k.float(), v.float(), rates, scale=0.7, initial_state=state, output_final_state=True
    )
    assert torch.equal(state, state_before), "the decode step must not modify its input state"
    assert out.shape == (batch, 1, heads, value_dim) and out.dtype == dtype
    assert new_state.shape == state.shape and new_state.dtype == torch.float32
    assert_close_to_ref("o", out, truth, _baseline(base, dtype), rtol=2e-6)
    assert_close_to_ref("state", new_state, truth_state, rtol=2e-6)


def test_decode_steps_chained_match_chunk_reference_with_initial_state():
    batch, heads, key_dim, value_dim, steps = 2, 2, 32, 16, 5
    q, k, v = (torch.randn(batch, steps, heads, d) for d in (key_dim, key_dim, value_dim))
    rates = torch.tensor([0.05, 1.0])
    initial = torch.randn(batch, heads, key_dim, value_dim)
    state, outputs = initial, []
    for t in range(steps):
        out, state = lightning_attn_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], rates, state, backend="triton")
        outputs.append(out)
    truth, truth_state = lightning_attn_chunk_ref(
        q.double(), k.double(), v.double(), rates, initial_state=initial.double(), output_final_state=True, block_size=4
    )
    assert_close_to_ref("o", torch.cat(outputs, dim=1), truth, rtol=2e-6)
    assert_close_to_ref("state", state, truth_state, rtol=2e-6)


def test_decode_strided_inputs_like_the_model():
    # The model's q, k, v are views of one (B, 1, 3 * H * D) projection; the kernel reads them through strides.
    batch, heads, dim = 2, 2, 16
    qkv = torch.randn(batch, 1, 3 * heads * dim)
    q, k, v = (t.view(batch, 1, heads, dim) for t in qkv.chunk(3, dim=-1))
    rates, state = torch.tensor([0.1, 0.5]), torch.randn(batch, heads, dim, dim)
    out, new_state = lightning_attn_step(q, k, v, rates, state, backend="triton")
    truth, truth_state = lightning_attn_recurrent_ref(
        q.double(), k.double(), v.double(), rates, initial_state=state.double(), output_final_state=True
    )
    assert_close_to_ref("o", out, truth, rtol=2e-6)
    assert_close_to_ref("state", new_state, truth_state, rtol=2e-6)


def test_decode_bad_input_errors():
    q, k, v = _decode_inputs(2, 2, 16, 16)
    rates = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match="state must be float32"):
        lightning_attn_step(q, k, v, rates, torch.zeros(2, 2, 16, 16, dtype=torch.float64), backend="triton")
    with pytest.raises(ValueError, match="initial_state must have shape"):
        lightning_attn_step(q, k, v, rates, torch.zeros(2, 2, 16, 8), backend="triton")
    with pytest.raises(ValueError, match="one token"):
        lightning_attn_step(q.expand(2, 3, 2, 16), k, v, rates, torch.zeros(2, 2, 16, 16), backend="triton")
    with pytest.raises(ValueError, match="decay_rates"):
        lightning_attn_step(q, k, v, torch.tensor([0.1]), torch.zeros(2, 2, 16, 16), backend="triton")


def test_decode_op_traces_with_fullgraph_compile():
    q, k, v = _decode_inputs(2, 2, 16, 16)
    rates, state = torch.tensor([0.1, 0.2]), torch.randn(2, 2, 16, 16)
    torch._dynamo.reset()
    step = torch.compile(lambda *a: lightning_attn_step(*a, backend="triton"), fullgraph=True, backend="aot_eager")
    for got, want in zip(step(q, k, v, rates, state), lightning_attn_step(q, k, v, rates, state, backend="triton")):
        torch.testing.assert_close(got, want)


def test_kernels_first_used_inside_one_compiled_graph(monkeypatch):
    """A compiled decode step after an eager prefill meets the decode kernel for the first time mid-trace."""
    import transnormer_hf.kernels as kernels

    monkeypatch.setattr(kernels, "_TRITON_MODULES", {})  # as in a fresh process: nothing imported yet
    monkeypatch.setattr(kernels, "_TRITON_IMPORT_ERRORS", {})
    q, k, v = _decode_inputs(2, 2, 16, 16)
    rates, state = torch.tensor([0.1, 0.2]), torch.randn(2, 2, 16, 16)

    def norm_then_step(q, k, v, rates, state):
        return lightning_attn_step(srms_norm(q, EPS, backend="triton"), k, v, rates, state, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(norm_then_step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(q, k, v, rates, state), norm_then_step(q, k, v, rates, state)):
        torch.testing.assert_close(got, want)
