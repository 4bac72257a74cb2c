"""The official code's outputs on the tnl_tiny_a fixture, reproduced on the GPU by each backend in each dtype: training-
and eval-mode logits and hidden states, step-by-step decoding, a long prefill's logits and states and its continuation,
a left-padded batch, greedy and left-padded greedy generation. (Formerly benchmarks/gpu_checks.py.)

Tolerance: fp32, both backends, relative RMS error at most 1e-5 from the official fp32 outputs (what the CPU suite
holds the torch path to; TF32 products would be ~1e-3 off) and greedy sequences identical. bf16 / fp16 on Triton: at
most 2x the torch path's error in the same dtype plus one unit roundoff (gpu_suite.SLACK), and finite; their greedy
tokens may differ from fp32's at near-ties, so only fp32's are compared.
"""

from __future__ import annotations

import pytest
import torch
from checks import assert_close_to_ref
from .gpu_suite import DEVICE, DTYPES, SLACK, dtype_name

from transnormer_hf import TransNormerLLMForCausalLM
from transnormer_hf.modeling_transnormer import CACHE_FIELD

FP32_BOUND = 1e-5


def fixture_outputs(model: TransNormerLLMForCausalLM, ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's output for every reference the fixture holds, by the fixture's key, on the CPU."""
    ids = ref["train.input_ids"].to(DEVICE)
    outputs = {}
    with torch.no_grad():
        model.train()
        out = model(ids, output_hidden_states=True)
        outputs["train.logits"] = out.logits
        for index, hidden in enumerate(out.hidden_states):
            outputs[f"train.hidden_states.{index}"] = hidden
        model.eval()
        outputs["eval.logits"] = model(ids, use_cache=False).logits
        cache, steps = None, []
        for t in range(ids.shape[1]):
            step = model(ids[:, t:t + 1], use_cache=True, **{CACHE_FIELD: cache})
            cache = getattr(step, CACHE_FIELD)
            steps.append(step.logits)
        outputs["decode.logits"] = torch.cat(steps, dim=1)
        out = model(ref["long.input_ids"].to(DEVICE), use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        outputs["long.logits"] = out.logits
        for layer in range(model.config.num_hidden_layers):
            outputs[f"long.state.{layer}"] = cache[layer]
        following = model(ref["long.next_input_ids"].to(DEVICE), use_cache=True, **{CACHE_FIELD: cache})
        outputs["long.next_logits"] = following.logits
        mask = ref["pad.attention_mask"].to(DEVICE)
        logits = model(ref["pad.input_ids"].to(DEVICE), attention_mask=mask, use_cache=False).logits
        outputs["pad.logits"] = logits[mask.bool()]  # real tokens only: the official outputs at padding are junk
    for case in ("greedy", "greedy_pad"):
        prompt = ref[f"{case}.input_ids"].to(DEVICE)
        mask = ref.get(f"{case}.attention_mask", torch.ones_like(ref[f"{case}.input_ids"])).to(DEVICE)
        outputs[f"{case}.sequences"] = model.generate(prompt, attention_mask=mask, max_new_tokens=16, do_sample=False,
                                                      eos_token_id=None)
    return {key: value.float().cpu() for key, value in outputs.items()}


def _official(reference: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key == "pad.logits":
        return reference[key][reference["pad.attention_mask"].bool()]
    return reference[key]


@pytest.fixture(scope="module")
def torch_path_outputs(fixture_dir, reference):
    """The torch path's outputs in each dtype: the baselines of the 16-bit Triton runs."""
    outputs = {}
    for dtype in DTYPES:
        model = TransNormerLLMForCausalLM.from_pretrained(fixture_dir / "hf", dtype=dtype, attention_backend="torch")
        outputs[dtype] = fixture_outputs(model.to(DEVICE), reference)
    return outputs


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fixture_outputs(fixture_dir, reference, torch_path_outputs, backend, dtype):
    if backend == "torch":
        got = torch_path_outputs[dtype]
    else:
        model = TransNormerLLMForCausalLM.from_pretrained(fixture_dir / "hf", dtype=dtype, attention_backend=backend)
        got = fixture_outputs(model.to(DEVICE), reference)
    for key, value in got.items():
        if key.endswith(".sequences"):
            if dtype == torch.float32:
                assert torch.equal(value.long(), reference[key]), f"{key}: {value.long().tolist()}"
            continue
        official = _official(reference, key)
        if dtype == torch.float32:
            assert_close_to_ref(f"{backend} {key}", value, official, rtol=FP32_BOUND)
        elif backend == "triton":
            assert_close_to_ref(f"{backend} {key}", value, official, torch_path_outputs[dtype][key],
                                slack=SLACK[dtype])
        else:
            assert torch.isfinite(value).all(), f"{backend} {key}: non-finite values"
