"""Exact numerics on the GPU (issue 20 item 1, issue 21 item 1): fp32 layers on the Triton path equal the torch
path at real shapes and lengths (they once stopped with OutOfResources: shared memory), and fp16 stays finite.

    pytest -q -m gpu tests/gpu/test_numerics.py
"""

import pytest
import torch

from transnormer_hf import TransNormerLLMConfig, TransNormerLLMForCausalLM
from transnormer_hf.modeling_transnormer import TransNormerLLMDecoderLayer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FP32_BOUND = 1e-5  # relative RMS, Triton path against the torch path, both fp32 (IEEE products: torch's default)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _layer_pair(preset: str, layer_idx: int):
    """The same random decoder layer on the torch and the Triton path, fp32, on the GPU."""
    torch.manual_seed(layer_idx)
    layers = []
    for backend in ("torch", "triton"):
        config = TransNormerLLMConfig.from_preset(preset, vocab_size=256, attention_backend=backend)
        layers.append(TransNormerLLMDecoderLayer(config, layer_idx).cuda())
        for parameter in layers[-1].parameters():
            torch.nn.init.normal_(parameter, std=config.initializer_range)
    layers[1].load_state_dict(layers[0].state_dict())
    return layers, config


def _forward_backward(layer, hidden, cu_seqlens=None):
    hidden = hidden.clone().requires_grad_()
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    out, _ = layer(hidden, None, positions, None, cu_seqlens, False)
    grads = torch.autograd.grad(out.square().mean(), [hidden, *layer.parameters()])
    return out.detach(), grads


def _compare(layers, hidden, cu_seqlens=None):
    (ref, ref_grads), (out, grads) = (_forward_backward(layer, hidden, cu_seqlens) for layer in layers)
    errors = {"out": rel_err(out, ref), "d_hidden": rel_err(grads[0], ref_grads[0]),
              "d_params": max(rel_err(g, r) for g, r in zip(grads[1:], ref_grads[1:]))}
    print(errors)
    assert all(err <= FP32_BOUND for err in errors.values()), errors


@pytest.mark.parametrize("length", [2048, 8192, 32768, 65536])
@pytest.mark.parametrize("layer_idx", [0, -1], ids=["lrpe-dk256", "last"])
@pytest.mark.parametrize("preset", ["1B", "385M"])
def test_fp32_layer_forward_backward_matches_torch_path(preset, layer_idx, length):
    layers, config = _layer_pair(preset, layer_idx % TransNormerLLMConfig.from_preset(preset).num_hidden_layers)
    hidden = torch.randn(1, length, config.hidden_size, device="cuda")
    _compare(layers, hidden)


@pytest.mark.parametrize("preset", ["1B", "385M"])
def test_fp32_varlen_layer_matches_torch_path(preset):
    layers, config = _layer_pair(preset, 0)
    lengths = [20000, 300, 7000, 1, 4000]  # one long document among short ones: splits and tails
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
    hidden = torch.randn(1, sum(lengths), config.hidden_size, device="cuda")
    _compare(layers, hidden, cu_seqlens)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp16_1b_model_on_16k_tokens_is_finite_and_tracks_fp32(backend):
    torch.manual_seed(0)
    config = TransNormerLLMConfig.from_preset("1B", vocab_size=4096, attention_backend=backend)
    model = TransNormerLLMForCausalLM(config).cuda().eval()
    ids = torch.randint(0, 4096, (1, 16384), device="cuda")
    with torch.no_grad():
        ref = model(ids, logits_to_keep=512).logits
        half = model.half()
        out = half(ids, logits_to_keep=512).logits
    finite = torch.isfinite(out).all().item()
    err = rel_err(out.float(), ref)
    max_err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    print({"backend": backend, "finite": finite, "rel_rms": err, "max_rel": max_err})
    assert finite and err <= 2e-2, (finite, err)
