"""The torch Lightning Attention forms (chunked CPU path, recurrent decode) against the float64 definition."""

import pytest
import torch

from checks import assert_close_to_ref
from transnormer_hf.kernels.reference import _lightning_attn_all_blocks
from transnormer_hf.kernels import (
    lightning_attn,
    lightning_attn_chunk_ref,
    lightning_attn_parallel_ref,
    lightning_attn_recurrent_ref,
    lightning_attn_step,
    srms_norm,
)


def _inputs(batch, length, heads, key_dim, value_dim, dtype=torch.float32, with_state=False, num_states=None):
    q = torch.randn(batch, length, heads, key_dim, dtype=dtype)
    k = torch.randn(batch, length, heads, key_dim, dtype=dtype)
    v = torch.randn(batch, length, heads, value_dim, dtype=dtype)
    decay_rates = torch.linspace(0.01, 0.9, heads)  # includes fast and slow decays
    state = None
    if with_state:
        state = torch.randn(num_states or batch, heads, key_dim, value_dim, dtype=torch.float32)
    return q, k, v, decay_rates, state


def _float64(*tensors):
    return tuple(None if t is None else t.double() for t in tensors)


def _python_loop(q, k, v, decay_rates, state):
    """The definition written out with explicit loops over batch, head and time, in float64."""
    batch, length, heads, key_dim = q.shape
    out = torch.zeros(batch, length, heads, v.shape[-1], dtype=torch.float64)
    final = torch.zeros(batch, heads, key_dim, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            decay = torch.exp(-decay_rates[h].double())
            running = state[b, h].double() if state is not None else torch.zeros(key_dim, v.shape[-1], dtype=torch.float64)
            for t in range(length):
                running = decay * running + torch.outer(k[b, t, h].double(), v[b, t, h].double())
                out[b, t, h] = q[b, t, h].double() @ running
            final[b, h] = running
    return out, final


def test_parallel_reference_equals_the_explicit_loop():
    q, k, v, rates, state = _inputs(2, 9, 3, 4, 5, with_state=True)
    out, final = lightning_attn_parallel_ref(*_float64(q, k, v), rates, initial_state=state.double(),
                                             output_final_state=True)
    loop_out, loop_final = _python_loop(q, k, v, rates, state)
    torch.testing.assert_close(out, loop_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, loop_final, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length", [1, 63, 64, 65, 130, 200])
@pytest.mark.parametrize("key_dim,value_dim", [(16, 16), (32, 16)])  # 32 x 16: an LRPE layer, d_k = 2 d_v
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_and_recurrent_match_float64(length, key_dim, value_dim, with_state):
    q, k, v, rates, state = _inputs(2, length, 3, key_dim, value_dim, with_state=with_state)
    q, k = q * 0.3, k * 0.3
    truth, truth_final = lightning_attn_parallel_ref(*_float64(q, k, v), rates, initial_state=_float64(state)[0],
                                                     output_final_state=True)
    # _lightning_attn_all_blocks is the chunked form as torch.compile runs it
    for form in (lightning_attn_chunk_ref, _lightning_attn_all_blocks, lightning_attn_recurrent_ref):
        out, final = form(q, k, v, rates, initial_state=state, output_final_state=True)
        assert out.dtype == torch.float32 and final.dtype == torch.float32
        assert_close_to_ref(f"{form.__name__} o", out, truth)
        assert_close_to_ref(f"{form.__name__} state", final, truth_final)


def test_chunk_memory_does_not_build_an_n_by_n_matrix(monkeypatch):
    """The CPU path must stay linear in N: no intermediate may be as large as N x N."""
    length, largest = 1024, []
    original = torch.Tensor.__matmul__

    def recording_matmul(a, b):
        result = original(a, b)
        largest.append(result.shape[-1] * result.shape[-2])
        return result

    q, k, v, rates, _ = _inputs(1, length, 1, 8, 8)
    monkeypatch.setattr(torch.Tensor, "__matmul__", recording_matmul)
    monkeypatch.setattr(torch, "matmul", recording_matmul)
    lightning_attn_chunk_ref(q, k, v, rates)
    monkeypatch.undo()
    assert largest, "the chunked path did not use matmul, so this test no longer watches it"
    assert max(largest) < length * length // 4


def test_varlen_resets_the_state_at_each_boundary():
    lengths = [5, 70, 1, 33]
    docs = [_inputs(1, n, 2, 16, 8) for n in lengths]
    states = torch.randn(len(lengths), 2, 16, 8)
    packed = [torch.cat([d[i] for d in docs], dim=1) for i in range(3)]
    cu_seqlens = torch.tensor([0, 5, 75, 76, 109])
    rates = docs[0][3]
    out, final = lightning_attn(*packed, rates, initial_state=states, output_final_state=True, cu_seqlens=cu_seqlens)
    for index, (q, k, v, _, _) in enumerate(docs):
        alone, alone_final = lightning_attn_parallel_ref(*_float64(q, k, v), rates,
                                                         initial_state=states[index:index + 1].double(),
                                                         output_final_state=True)
        start, end = cu_seqlens[index], cu_seqlens[index + 1]
        assert_close_to_ref(f"doc {index} o", out[:, start:end], alone)
        assert_close_to_ref(f"doc {index} state", final[index:index + 1], alone_final)


def test_steps_continue_a_prefill_exactly():
    q, k, v, rates, _ = _inputs(2, 90, 2, 32, 16)
    truth, truth_final = lightning_attn_parallel_ref(*_float64(q, k, v), rates, output_final_state=True)
    out, state = lightning_attn(q[:, :77], k[:, :77], v[:, :77], rates, output_final_state=True)
    outs = [out]
    for t in range(77, 90):
        step_out, state = lightning_attn_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], rates, state)
        outs.append(step_out)
    assert_close_to_ref("prefill + steps", torch.cat(outs, dim=1), truth)
    assert_close_to_ref("final state", state, truth_final)


def test_bf16_inputs_keep_fp32_state_and_bf16_output():
    q, k, v, rates, _ = _inputs(1, 100, 2, 16, 16)
    out, final = lightning_attn(q.bfloat16(), k.bfloat16(), v.bfloat16(), rates, output_final_state=True)
    assert out.dtype == torch.bfloat16 and final.dtype == torch.float32
    truth = lightning_attn_parallel_ref(*_float64(q.bfloat16(), k.bfloat16(), v.bfloat16()), rates)[0]
    assert_close_to_ref("bf16 o", out, truth, rtol=1e-2)


def test_scale_multiplies_q():
    q, k, v, rates, _ = _inputs(1, 20, 2, 8, 8)
    scaled = lightning_attn(q, k, v, rates, scale=0.25)[0]
    torch.testing.assert_close(scaled, lightning_attn(q * 0.25, k, v, rates)[0])


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(q=torch.randn(2, 5, 3)), "must be 4-D"),
        (dict(k=torch.randn(2, 5, 3, 7)), "q and k must have the same shape"),
        (dict(v=torch.randn(2, 6, 3, 8)), "v must match q"),
        (dict(decay_rates=torch.ones(2)), "decay_rates must be a float tensor of shape"),
        (dict(initial_state=torch.zeros(2, 3, 4, 8)), "initial_state"),
        (dict(cu_seqlens=torch.tensor([0.0, 5.0])), "cu_seqlens"),
    ],
)
def test_bad_arguments_name_the_argument(change, message):
    args = dict(q=torch.randn(2, 5, 3, 8), k=torch.randn(2, 5, 3, 8), v=torch.randn(2, 5, 3, 8),
                decay_rates=torch.ones(3), initial_state=None, cu_seqlens=None)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        lightning_attn(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("decay_rates"), **args)


def test_unknown_backend_is_refused():
    q, k, v, rates, _ = _inputs(1, 4, 1, 4, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        lightning_attn(q, k, v, rates, backend="cuda")


def test_srms_norm_matches_float64():
    x = torch.randn(3, 7, 32) * 5
    truth = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    assert_close_to_ref("srms_norm", srms_norm(x, 1e-6), truth)
    assert srms_norm(x.bfloat16(), 1e-6).dtype == torch.bfloat16


@pytest.mark.parametrize("form", [lightning_attn_chunk_ref, _lightning_attn_all_blocks], ids=["loop", "compiled"])
@pytest.mark.parametrize("lengths", [[5, 70, 1, 33, 130], [64, 64], [200]])
def test_packed_sequences_without_states_are_masked_not_looped(lengths, form):
    """Packed training takes the masked block form (no host reads); it must equal each document alone."""
    docs = [_inputs(1, n, 2, 16, 8) for n in lengths]
    q, k, v = (torch.cat([d[i] for d in docs], dim=1) for i in range(3))
    rates = docs[0][3]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    out, final = form(q, k, v, rates, cu_seqlens=cu_seqlens)
    assert final is None
    start = 0
    for index, (dq, dk, dv, _, _) in enumerate(docs):
        alone = lightning_attn_parallel_ref(*_float64(dq, dk, dv), rates)[0]
        assert_close_to_ref(f"doc {index}", out[:, start:start + lengths[index]], alone)
        start += lengths[index]


def test_packed_chunk_form_traces_without_graph_breaks():
    q, k, v, rates, _ = _inputs(1, 150, 2, 16, 8)
    cu_seqlens = torch.tensor([0, 40, 100, 150])
    explanation = torch._dynamo.explain(lightning_attn_chunk_ref)(q, k, v, rates, cu_seqlens=cu_seqlens)
    assert explanation.graph_break_count == 0, explanation.break_reasons
