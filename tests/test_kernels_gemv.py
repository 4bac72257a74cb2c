"""The few-row GEMV (kernels.gemv, Triton in the interpreter) against float64, when it runs, and how the model uses it.

The kernel runs for a decoding step's rows (at most 16, 16-bit, eager, no autograd); everything else must take
F.linear exactly as before, and layers that are not plain nn.Linear (hooks, wrappers, biases) stay modules.
"""

import pytest
import torch
from torch import nn

from conftest import tiny_config
from transnormer_hf import TransNormerLLMCache, TransNormerLLMForCausalLM
from transnormer_hf.kernels import GEMV_MAX_ROWS, gemv, gemv_ref, triton_gemv
from transnormer_hf.modeling_transnormer import project


@pytest.fixture
def kernel_calls(monkeypatch):
    """The number of Triton GEMV launches so far (a list, one entry per launch)."""
    calls = []
    launcher = triton_gemv.gemv

    def counted(*args):
        calls.append(args[0].shape)
        return launcher(*args)

    monkeypatch.setattr(triton_gemv, "gemv", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated, residual", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("rows, n, k", [(1, 40, 96), (5, 64, 512), (16, 2100, 200), (3, 4100, 1100)])
def test_gemv_vs_float64(rows, n, k, gated, residual, dtype, kernel_calls):
    """N and K not multiples of the tiles, 2048-row and wide configs, one to sixteen rows, with and without the gate
    and the residual; one rounding to dtype."""
    generator = torch.Generator().manual_seed(rows + n + k)
    x = torch.randn(1, rows, k, generator=generator).to(dtype)
    weight, gate = (torch.randn(n, k, generator=generator).div(k ** 0.5).to(dtype) for _ in range(2))
    skip = torch.randn(1, rows, n, generator=generator).mul(4).to(dtype) if residual else None
    out = gemv(x, weight, gate if gated else None, residual=skip, backend="triton")
    assert kernel_calls == [(rows, k)]
    truth = gemv_ref(x.double(), weight.double(), gate.double() if gated else None,
                     skip.double() if residual else None)
    assert out.shape == (1, rows, n) and out.dtype == dtype
    torch.testing.assert_close(out.double(), truth, rtol=1e-2, atol=1e-2 * truth.abs().max().item())


def test_gemv_reads_x_through_its_row_stride(kernel_calls):
    """The model's lm_head gets the last position of (B, N, D) hidden states: rows N * D apart."""
    hidden = torch.randn(3, 7, 64).bfloat16()
    weight = torch.randn(48, 64).bfloat16()
    out = gemv(hidden[:, -1:], weight, backend="triton")
    assert kernel_calls
    torch.testing.assert_close(out.float(), gemv_ref(hidden[:, -1:].float(), weight.float()), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("case", ["17 rows", "fp32", "autograd", "autocast", "strided weight", "torch backend"])
def test_gemv_leaves_everything_but_a_decoding_step_to_f_linear(case, kernel_calls):
    x = torch.randn(GEMV_MAX_ROWS + 1 if case == "17 rows" else 2, 32).bfloat16()
    weight = torch.randn(24, 32).bfloat16()
    backend = "torch" if case == "torch backend" else "triton"
    if case == "fp32":
        x, weight = x.float(), weight.float()
    if case == "autograd":
        weight.requires_grad_()
    if case == "strided weight":
        weight = torch.randn(32, 24).bfloat16().t()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        out = gemv(x, weight, backend=backend)
        expected = torch.nn.functional.linear(x, weight)
    assert kernel_calls == []
    assert torch.equal(out, expected)


def test_gemv_bad_shapes_name_the_arguments():
    with pytest.raises(ValueError, match="x's last dimension"):
        gemv(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="gate_weight"):
        gemv(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"residual must have the output's shape \(2, 4\)"):
        gemv(torch.randn(2, 8), torch.randn(4, 8), residual=torch.randn(2, 8))


class _Recorded(nn.Linear):
    """A Linear subclass (as PEFT, quantisation or FSDP2 make them) that records its calls."""

    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


def test_project_calls_layers_that_are_not_plain_linears(kernel_calls):
    x = torch.randn(1, 1, 16).bfloat16()
    plain = nn.Linear(16, 8, bias=False).bfloat16()
    biased = nn.Linear(16, 8).bfloat16()
    hooked = nn.Linear(16, 8, bias=False).bfloat16()
    seen = []
    hooked.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    wrapped = _Recorded(16, 8, bias=False).bfloat16()
    skip = torch.randn(1, 1, 8).bfloat16()
    for layer in (biased, hooked, wrapped):
        torch.testing.assert_close(project(x, layer, backend="triton"), layer(x))
        assert torch.equal(project(x, layer, backend="triton", residual=skip), skip + layer(x))  # added after
    torch.testing.assert_close(project(x, plain, hooked, backend="triton"), plain(x) * hooked(x))
    assert kernel_calls == [] and len(seen) == 6 and _Recorded.calls == 4  # each layer: two projects and two checks
    with torch.no_grad():
        out = project(x, plain, plain, backend="triton")
    assert kernel_calls == [(1, 16)]
    torch.testing.assert_close(out.float(), (plain(x) * plain(x)).float(), rtol=2e-2, atol=2e-2)


def test_a_bf16_decode_step_runs_its_projections_as_gemvs(kernel_calls):
    """Per layer: qkvu, out (plus the skip connection) and the gated l1 * l2, l3 (plus the skip); then lm_head. The
    prompt's 2 x 9 rows take F.linear, and the step's logits stay within bf16 rounding of the torch backend's."""
    torch.manual_seed(0)
    model = TransNormerLLMForCausalLM(tiny_config(attention_backend="triton")).bfloat16().eval()
    reference = TransNormerLLMForCausalLM(tiny_config(attention_backend="torch")).bfloat16().eval()
    reference.load_state_dict(model.state_dict())
    prompt, step = torch.randint(3, 48, (2, 9)), torch.randint(3, 48, (2, 1))
    logits = []
    with torch.no_grad():
        for each in (model, reference):
            cache = TransNormerLLMCache(each.config)
            each(prompt, cache=cache, use_cache=True)
            logits.append(each(step, cache=cache, use_cache=True).logits.float())
    assert len(kernel_calls) == 4 * model.config.num_hidden_layers + 1
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0.05 * logits[1].abs().max().item())
