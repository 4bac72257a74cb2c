"""The Triton kernels at the released shapes (385M, 1B, 7B heads; LRPE layers with d_k = 2 d_v), in fp32, bf16 and
fp16, against the float64 truth, with the torch twin in the same dtype as the baseline.

Tolerance (every comparison): the kernel's relative RMS error from the float64 truth is at most 2x the twin's plus
gpu_suite.SLACK[dtype] (one unit roundoff of the dtype, for the kernel's rounding of P and the state to the input
dtype; 2^-20 in fp32). A shared-memory or register limit at any of these shapes is a failure, not a skip.
"""

from __future__ import annotations

import functools

import pytest
import torch
from checks import assert_close_to_ref
from .gpu_suite import (DEVICE, DRY, DTYPES, HEADS, LENGTHS, LONGEST, SLACK, dtype_name, kernel_group, gpu_memory,
                        length_variant, representable)

from transnormer_hf.configuration_transnormer import PRESETS as PRESET_FIELDS
from transnormer_hf.kernels import (
    gated_srms_norm,
    gated_srms_norm_ref,
    lightning_attn,
    lightning_attn_chunk_ref,
    lightning_attn_recurrent_ref,
    lightning_attn_step,
    srms_norm,
    srms_norm_ref,
)
from transnormer_hf.modeling_transnormer import decay_rates

PRESETS = tuple(HEADS)
# The LRPE layer is layer 0 (strongest decay, d_k = 2 d_v); the plain layer is the last (rates ~1e-5: lambda ~ 1,
# the state sums the whole sequence).
KINDS = ("lrpe", "plain")
NAMES = ("o", "final_state", "dq", "dk", "dv", "d_initial_state")


def _layer(preset: str, kind: str) -> tuple[int, int, int, torch.Tensor]:
    """(heads, d_k, d_v, decay rates) of the preset's LRPE layer 0 or its last (plain) layer."""
    heads, head_dim = HEADS[preset]
    num_layers = PRESET_FIELDS[preset]["num_hidden_layers"]
    layer = 0 if kind == "lrpe" else num_layers - 1
    rates = torch.tensor(decay_rates(heads, layer, num_layers), dtype=torch.float32, device=DEVICE)
    return heads, (2 if kind == "lrpe" else 1) * head_dim, head_dim, rates


def _cases():
    """(preset, kind, length, dtype). The presets share the head dims (128, and 256 on LRPE layers) and differ only
    in the head count, so the 1B shape runs at every length and the others at 2K and 8K (which keeps the suite inside
    its time on one GPU). Grouped by kernel variant (kind, dtype, length class: each compiles once); peaks at 64K:
    20-33 GiB."""
    for length in LENGTHS:
        for preset in PRESETS:
            if preset != "1B" and not DRY and length not in (2048, 8192):
                continue
            for kind in KINDS:
                for dtype in DTYPES:
                    marks = [kernel_group(kind, dtype, length_variant(length))]
                    marks += [gpu_memory(36)] if length == LONGEST else []
                    yield pytest.param(preset, kind, length, dtype, marks=marks,
                                       id=f"{preset}-{kind}-N{length}-{dtype_name(dtype)}")


def _inputs(batch: int, lengths: tuple[int, ...] | int, preset: str, kind: str, seed: int) -> dict:
    """fp32 inputs exact in every dtype (q, k as after the model's SiLU), fp32 states, float64 gradient seeds."""
    heads, key_dim, value_dim, rates = _layer(preset, kind)
    total = lengths if isinstance(lengths, int) else sum(lengths)
    num_states = batch if isinstance(lengths, int) else len(lengths)
    generator = torch.Generator(DEVICE).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=DEVICE)

    silu = torch.nn.functional.silu
    return dict(
        q=representable(silu(randn(batch, total, heads, key_dim))),
        k=representable(silu(randn(batch, total, heads, key_dim))),
        v=representable(randn(batch, total, heads, value_dim)),
        h0=randn(num_states, heads, key_dim, value_dim),
        do=representable(randn(batch, total, heads, value_dim)).double(),
        dht=randn(num_states, heads, key_dim, value_dim).double(),
        rates=rates,
    )


def _fwd_bwd(fn, inputs: dict, dtype: torch.dtype, **kwargs) -> dict[str, torch.Tensor]:
    """o, the final state and the gradients of (o . do + final_state . dht) w.r.t. q, k, v and the initial state."""
    q, k, v = (inputs[name].to(dtype).requires_grad_() for name in "qkv")
    h0 = inputs["h0"].to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    o, final_state = fn(q, k, v, inputs["rates"], initial_state=h0, output_final_state=True, **kwargs)
    loss = (o.double() * inputs["do"]).sum() + (final_state.double() * inputs["dht"]).sum()
    grads = torch.autograd.grad(loss, (q, k, v, h0))
    assert o.dtype == dtype and final_state.dtype == h0.dtype
    return dict(zip(NAMES, (o.detach(), final_state.detach(), *grads)))


@functools.lru_cache(maxsize=1)  # one truth held at a time
def _truth(batch: int, lengths: tuple[int, ...] | int, preset: str, kind: str, seed: int) -> tuple[dict, dict]:
    inputs = _inputs(batch, lengths, preset, kind, seed)
    cu_seqlens = _cu_seqlens(lengths)
    return inputs, _fwd_bwd(lightning_attn_chunk_ref, inputs, torch.float64, cu_seqlens=cu_seqlens)


@pytest.fixture(scope="module", autouse=True)
def _release_truth():
    yield
    _truth.cache_clear()


def _cu_seqlens(lengths: tuple[int, ...] | int) -> torch.Tensor | None:
    if isinstance(lengths, int):
        return None
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


@pytest.fixture
def split_runs(monkeypatch):
    """Counts the kernel's segment-split runs (each carries the segments' states once); in the dry run the split
    thresholds drop to the tiny lengths there, as in tests/test_kernels_attention.py."""
    from transnormer_hf.kernels import triton_lightning_attn as module

    runs = []
    carry = module._carry_states

    def counting_carry(*args, **kwargs):
        runs.append(1)
        return carry(*args, **kwargs)

    monkeypatch.setattr(module, "_carry_states", counting_carry)
    if DRY:
        monkeypatch.setattr(module, "_MIN_SEGMENT", 64)
        monkeypatch.setattr(module, "_MIN_SPLIT_TOKENS", LONGEST)
    return runs


def _check_against_truth(got: dict, baseline: dict, truth: dict, dtype: torch.dtype, label: str) -> None:
    for name in NAMES:
        assert got[name].shape == truth[name].shape, f"{label} {name}: shape {tuple(got[name].shape)}"
        assert_close_to_ref(f"{label} {name}", got[name], truth[name], baseline[name], slack=SLACK[dtype])


@pytest.mark.parametrize("preset, kind, length, dtype", list(_cases()))
def test_attention_forward_backward_states(preset, kind, length, dtype, split_runs):
    batch = 1 if length == LONGEST else 2
    inputs, truth = _truth(batch, length, preset, kind, seed=length)
    got = _fwd_bwd(lightning_attn, inputs, dtype, backend="triton")
    # The longest length leaves B * H * value slices far below two programs per SM: the segment split must run.
    assert bool(split_runs) == (length == LONGEST), f"segment split runs: {len(split_runs)}"
    baseline = _fwd_bwd(lightning_attn, inputs, dtype, backend="torch")
    _check_against_truth(got, baseline, truth, dtype, f"{preset} {kind} N={length}")


# Packed sequences: empty and 1-token ones, a partial chunk, and one long sequence among short ones. With 7 sequences
# the grid is small enough for the long one to be split into segments; with 16 it is not.
VARLEN = {
    "split": (0, 1, 63, 300, 1, 40, 0) if DRY else (0, 1, 63, 20000, 1, 2048, 0),
    "whole": (1, 0, 63, 300, 1, 5, 40, 2, 0, 7, 1, 9, 64, 65, 3, 1) if DRY else
             (1, 0, 63, 20000, 1, 5, 2048, 2, 0, 777, 1, 9, 64, 65, 3, 1),
}


def _varlen_cases():
    for packing in VARLEN:
        for kind in KINDS:
            for dtype in DTYPES:
                yield pytest.param(packing, kind, dtype, marks=[kernel_group(kind, dtype, f"varlen-{packing}"),
                                                                gpu_memory(24)],
                                   id=f"{packing}-{kind}-{dtype_name(dtype)}")


@pytest.mark.parametrize("packing, kind, dtype", list(_varlen_cases()))
def test_attention_varlen(packing, kind, dtype, split_runs):
    lengths = VARLEN[packing]
    inputs, truth = _truth(1, lengths, "1B", kind, seed=len(lengths))
    cu_seqlens = _cu_seqlens(lengths)
    got = _fwd_bwd(lightning_attn, inputs, dtype, cu_seqlens=cu_seqlens, backend="triton")
    # (The dry run's tiny grids are always below its 264-program CPU target: both packings split there.)
    assert bool(split_runs) == (packing == "split" or DRY), f"segment split runs: {len(split_runs)}"
    baseline = _fwd_bwd(lightning_attn, inputs, dtype, cu_seqlens=cu_seqlens, backend="torch")
    _check_against_truth(got, baseline, truth, dtype, f"varlen {packing} {kind}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_decode_step(preset, kind, dtype):
    """The one-token step (its own kernel) on a batch of 4 from a random fp32 state."""
    inputs = _inputs(4, 1, preset, kind, seed=7)
    q, k, v = (inputs[name].to(dtype) for name in "qkv")
    rates, state = inputs["rates"], inputs["h0"]
    o, new_state = lightning_attn_step(q, k, v, rates, state, backend="triton")
    o_twin, state_twin = lightning_attn_step(q, k, v, rates, state, backend="torch")
    o_truth, state_truth = lightning_attn_recurrent_ref(q.double(), k.double(), v.double(), rates,
                                                        initial_state=state.double(), output_final_state=True)
    assert o.dtype == dtype and new_state.dtype == torch.float32
    assert_close_to_ref(f"{preset} {kind} step o", o, o_truth, o_twin, slack=SLACK[dtype])
    assert_close_to_ref(f"{preset} {kind} step state", new_state, state_truth, state_twin, slack=SLACK[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_fused_decode_step(preset, kind, dtype):
    """The model's Triton decode step, one kernel from the raw q, k projections (SiLU, LRPE at a long position,
    state update, output), on a batch of 4, also in place on the state as the static cache runs it."""
    from transnormer_hf.kernels import lightning_attn_step_fused, lightning_attn_step_fused_ref
    from transnormer_hf.modeling_transnormer import lrpe_initial_theta

    heads, head_dim = HEADS[preset]
    inputs = _inputs(4, 1, preset, kind, seed=11)
    generator = torch.Generator(DEVICE).manual_seed(11)
    q, k = (representable(torch.randn(4, 1, heads, head_dim, generator=generator, device=DEVICE)).to(dtype)
            for _ in range(2))
    v, rates, state = inputs["v"].to(dtype), inputs["rates"], inputs["h0"]
    lrpe = {}
    if kind == "lrpe":  # the model's theta; position 8191 (the last of an 8K prompt) puts theta * t far from 0
        lrpe = dict(theta=lrpe_initial_theta(heads, head_dim).to(DEVICE),
                    position=torch.tensor([LENGTHS[-2] - 1], device=DEVICE))
    o, new_state = lightning_attn_step_fused(q, k, v, rates, state, activation="silu", backend="triton", **lrpe)
    in_place = state.clone()
    o_in_place, returned = lightning_attn_step_fused(q, k, v, rates, in_place, activation="silu", out_state=in_place,
                                                     backend="triton", **lrpe)
    # The twin in fp32 (its angles round as the kernel's do), the truth in float64.
    o_twin, state_twin = lightning_attn_step_fused_ref(q, k, v, rates, state, activation="silu", **lrpe)
    o_truth, state_truth = lightning_attn_step_fused_ref(q.double(), k.double(), v.double(), rates.double(),
                                                         state.double(), activation="silu", **lrpe)
    assert o.dtype == dtype and new_state.dtype == torch.float32
    assert returned.data_ptr() == in_place.data_ptr(), "out_state was not the state returned"
    assert torch.equal(o_in_place, o) and torch.equal(in_place, new_state), "the in-place step computed otherwise"
    assert_close_to_ref(f"{preset} {kind} fused step o", o, o_truth, o_twin, slack=SLACK[dtype])
    assert_close_to_ref(f"{preset} {kind} fused step state", new_state, state_truth, state_twin, slack=SLACK[dtype])


# Widths of the norms: the hidden size (token and channel norms) and the attention width (the gated output norm).
WIDTHS = {name: heads * head_dim for name, (heads, head_dim) in HEADS.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("gated", [False, True], ids=["srms_norm", "gated_srms_norm"])
def test_norm_forward_backward(gated, preset, dtype):
    """SRMSNorm (the token and channel norms) and the gated output norm u * norm(o) on 8K rows of the preset's width."""
    rows, width = (64 if DRY else 8192), WIDTHS[preset]
    x, gate, dy = (representable(torch.randn(rows, width, device=DEVICE)) for _ in range(3))

    def run(op, dtype, **backend):
        inputs = [tensor.to(dtype).requires_grad_() for tensor in ((x, gate) if gated else (x,))]
        out = op(*inputs, 1e-6, **backend)
        return [out.detach(), *torch.autograd.grad((out.double() * dy.double()).sum(), inputs)]

    op, ref = (gated_srms_norm, gated_srms_norm_ref) if gated else (srms_norm, srms_norm_ref)
    got, baseline, truth = run(op, dtype, backend="triton"), run(ref, dtype), run(ref, torch.float64)
    for name, out, twin, exact in zip(("y", "dx", "dgate"), got, baseline, truth):
        assert out.dtype == dtype, f"{name}: {out.dtype}"
        assert_close_to_ref(f"{preset} {name}", out, exact, twin, slack=SLACK[dtype])


def _decode_projections(preset: str) -> dict[str, tuple[int, int, bool]]:
    """name -> (N, K, gated) of every linear layer a decoding step of `preset` runs (tiny in the dry run)."""
    from transnormer_hf import TransNormerLLMConfig

    config = TransNormerLLMConfig(**PRESET_FIELDS[preset])
    hidden, inner, mlp, vocab = (config.hidden_size, config.attention_hidden_size, config.intermediate_size,
                                 config.vocab_size)
    if DRY:
        hidden, inner, mlp, vocab = 48, 32, 80, 100
    return {"qkvu": (4 * inner, hidden, False), "out": (hidden, inner, False), "l1*l2": (mlp, hidden, True),
            "l3": (hidden, mlp, False), "lm_head": (vocab, hidden, False)}


@pytest.mark.parametrize("rows", [1, 8, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_name)
@pytest.mark.parametrize("preset", PRESETS)
def test_decode_gemv(preset, dtype, rows):
    """The few-row Triton GEMV of a decoding step at the preset's projections, gated l1 * l2 included and out / l3
    with the decoder layer's skip connection added, against the float64 truth with cuBLAS (F.linear in the dtype,
    then the add) as the baseline."""
    from transnormer_hf.kernels import gemv, gemv_ref

    generator = torch.Generator(DEVICE).manual_seed(rows)
    for name, (n, k, gated) in _decode_projections(preset).items():
        x = representable(torch.randn(rows, k, generator=generator, device=DEVICE))
        weight, gate = (representable(torch.randn(n, k, generator=generator, device=DEVICE) / k**0.5)
                        for _ in range(2))
        gate = gate if gated else None
        skip = representable(torch.randn(rows, n, generator=generator, device=DEVICE)) if name in ("out", "l3") else None
        operands = (x, weight, gate, skip)
        low, exact = ([None if t is None else t.to(to) for t in operands] for to in (dtype, torch.float64))
        out = gemv(low[0], low[1], low[2], residual=low[3], backend="triton")
        baseline, truth = gemv_ref(*low), gemv_ref(*exact)
        assert out.dtype == dtype and out.shape == (rows, n)
        assert_close_to_ref(f"{preset} {name} rows={rows}", out, truth, baseline, slack=SLACK[dtype])
