"""The fused decode step (feature map + LRPE + state update + output, backend="triton" in the CPU interpreter)
against its float64 twin `lightning_attn_step_fused_ref`, and the twin against the model's unfused math."""

import pytest
import torch
from checks import assert_close_to_ref

from transnormer_hf.kernels import (
    STEP_ACTIVATIONS,
    lightning_attn_recurrent_ref,
    lightning_attn_step_fused,
    lightning_attn_step_fused_ref,
)
from transnormer_hf.modeling_transnormer import ACTIVATIONS, TransNormerLLMLrpe

POSITION = 37


def _like_interpreter_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 by truncation: the interpreter's cast on store."""
    return (x.float().contiguous().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _inputs(batch, heads, head_dim, value_dim, lrpe, dtype):
    # q and k are strided views, as the model's chunks of one projection are.
    qk = torch.randn(batch, 1, heads, 2 * head_dim).to(dtype)
    q, k = qk[..., :head_dim], qk[..., head_dim:]
    v = torch.randn(batch, 1, heads, value_dim).to(dtype)
    rates = torch.tensor([1e-5, 0.3, 4.0, 0.05, 1.0][:heads])
    key_dim = 2 * head_dim if lrpe else head_dim
    state = torch.randn(batch, heads, key_dim, value_dim)
    theta = torch.rand(heads, 1, head_dim) if lrpe else None
    position = torch.tensor([POSITION]) if lrpe else None
    return q, k, v, rates, state, theta, position


CASES = [  # batch, heads, D, d_v, LRPE, activation, dtype
    (2, 3, 32, 32, False, "silu", torch.float32),     # d_k = d_v
    (1, 3, 16, 32, True, "relu", torch.float32),      # d_k = 2 D = d_v
    (3, 5, 32, 32, True, "silu", torch.float32),      # d_k = 2 d_v
    (2, 3, 24, 40, True, "sigmoid", torch.float32),   # no power of two; phi(0) != 0 on the masked lanes
    (1, 2, 64, 64, True, "none", torch.float32),      # two BLOCK_K slices of the rotated features
    (2, 3, 32, 16, True, "swish", torch.bfloat16),    # bf16 inputs, upcast in the kernel
]


@pytest.mark.parametrize("batch,heads,head_dim,value_dim,lrpe,activation,dtype", CASES,
                         ids=[f"B{c[0]}-H{c[1]}-D{c[2]}-V{c[3]}-{'lrpe' if c[4] else 'nolrpe'}-{c[5]}-"
                              f"{'fp32' if c[6] == torch.float32 else 'bf16'}" for c in CASES])
def test_fused_step_vs_float64(batch, heads, head_dim, value_dim, lrpe, activation, dtype):
    q, k, v, rates, state, theta, position = _inputs(batch, heads, head_dim, value_dim, lrpe, dtype)
    state_before = state.clone()
    kwargs = dict(activation=activation, theta=theta, position=position, scale=0.7)
    out, new_state = lightning_attn_step_fused(q, k, v, rates, state, backend="triton", **kwargs)
    truth, truth_state = lightning_attn_step_fused_ref(q.double(), k.double(), v.double(), rates.double(),
                                                       state.double(), **kwargs)
    base, base_state = lightning_attn_step_fused_ref(q.float(), k.float(), v.float(), rates, state, **kwargs)
    assert torch.equal(state, state_before), "without out_state the input state is left alone"
    assert out.shape == (batch, 1, heads, value_dim) and out.dtype == dtype
    assert new_state.shape == state.shape and new_state.dtype == torch.float32
    # fp32 angles theta * t round like the fp32 twin's: with LRPE the twin in fp32 is the baseline.
    if dtype == torch.bfloat16:
        assert_close_to_ref("o", out, truth, _like_interpreter_bf16(base))
    elif lrpe:
        assert_close_to_ref("o", out, truth, base)
    else:
        assert_close_to_ref("o", out, truth, rtol=2e-6)
    if lrpe:
        assert_close_to_ref("state", new_state, truth_state, base_state)
    else:
        assert_close_to_ref("state", new_state, truth_state, rtol=2e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_step_in_place_writes_the_given_state(backend):
    q, k, v, rates, state, theta, position = _inputs(2, 3, 16, 32, True, torch.float32)
    kwargs = dict(activation="silu", theta=theta, position=position, backend=backend)
    want_out, want_state = lightning_attn_step_fused(q, k, v, rates, state, **kwargs)
    out, new_state = lightning_attn_step_fused(q, k, v, rates, state, out_state=state, **kwargs)
    assert new_state is state
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(state, want_state, rtol=0, atol=0)


def test_fused_twin_is_the_models_activation_lrpe_and_recurrent_step():
    batch, heads, dim = 2, 3, 8
    q, k, v, rates, state, _, _ = _inputs(batch, heads, dim, dim, True, torch.float64)
    lrpe = TransNormerLLMLrpe(heads, dim).double()
    positions = torch.tensor([POSITION])
    for name in STEP_ACTIVATIONS:
        act = ACTIVATIONS[name]
        unfused = lightning_attn_recurrent_ref(lrpe(act(q), positions), lrpe(act(k), positions), v, rates,
                                               initial_state=state, output_final_state=True)
        fused = lightning_attn_step_fused_ref(q, k, v, rates, state, activation=name, theta=lrpe.theta.detach(),
                                              position=positions)
        for got, want in zip(fused, unfused):  # the model's LRPE rounds its angles to fp32, the twin does not
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_fused_step_traces_with_fullgraph_compile():
    q, k, v, rates, state, theta, position = _inputs(2, 3, 16, 16, True, torch.float32)
    out_state = state.clone()

    def step(q, k, v, rates, state, theta, position, out_state):
        return lightning_attn_step_fused(q, k, v, rates, state, activation="silu", theta=theta, position=position,
                                         out_state=out_state, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got_out, got_state = compiled(q, k, v, rates, state, theta, position, out_state)
    want_out, want_state = step(q, k, v, rates, state, theta, position, None)
    torch.testing.assert_close(got_out, want_out)
    torch.testing.assert_close(got_state, want_state)
    torch.testing.assert_close(out_state, want_state)  # the traced op is functional; the copy lands in out_state


def test_fused_step_bad_input_errors():
    q, k, v, rates, state, theta, position = _inputs(2, 3, 16, 16, True, torch.float32)
    with pytest.raises(ValueError, match="activation must be one of"):
        lightning_attn_step_fused(q, k, v, rates, state, activation="exp", theta=theta, position=position)
    with pytest.raises(ValueError, match="theta and position together"):
        lightning_attn_step_fused(q, k, v, rates, state, activation="silu", theta=theta)
    with pytest.raises(ValueError, match=r"state must be float32 of shape \(2, 3, 32, 16\)"):
        lightning_attn_step_fused(q, k, v, rates, state[:, :, :16], activation="silu", theta=theta, position=position)
    with pytest.raises(ValueError, match="one token"):
        lightning_attn_step_fused(q.expand(2, 2, 3, 16), k, v, rates, state, activation="silu")
