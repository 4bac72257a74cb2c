"""The whole model at the TNL-1B shape (random weights, 16 layers, width 2048, 16 heads, 64000-word vocabulary) on
the GPU, in fp32, bf16 and fp16: prefill + decode, generate() with the default and the static cache on a left-padded
batch, the chunked loss forward and backward, gradient checkpointing.

Reference for logits: the same weights in fp32 on the torch path (no Triton). Tolerances:
- fp32 on Triton: relative RMS error at most 1e-5 from the reference (the bound the official fixture's fp32 outputs
  are held to; TF32 products would be ~1e-3 off);
- bf16, fp16: at most 2x the error of the torch path in the same dtype, plus one unit roundoff of the dtype
  (gpu_suite.SLACK; the kernels round P and the state to the input dtype), and finite.
The loss and its gradients (sums over all tokens, where a fixed bound would be wrong for small, cancelling
gradients such as LRPE's theta) are held to the float64 torch path instead: in every dtype at most 2x the torch
path's error in that dtype plus gpu_suite.SLACK.
"""

from __future__ import annotations

import pytest
import torch
from checks import assert_close_to_ref
from .gpu_suite import DEVICE, DRY, DTYPES, SLACK, dtype_name, gpu_memory, gpu_memory_share

from transnormer_hf import TransNormerLLMConfig, TransNormerLLMForCausalLM, decoding_transnormer
from transnormer_hf.decoding_transnormer import GraphedDecodeStep
from transnormer_hf.modeling_transnormer import CACHE_FIELD

FP32_BOUND = 1e-5
PREFILL = 40 if DRY else 8192  # the length at which the 1B shape once ran out of shared memory in fp32
DECODE_STEPS = 4
PROMPT, PAD, NEW_TOKENS = (12, 5, 4) if DRY else (1024, 37, 8)
LOSS_TOKENS, LOSS_CHUNK = (48, 16) if DRY else (4096, 1024)


def _config(**overrides) -> TransNormerLLMConfig:
    if DRY:
        fields = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                      lrpe_layers=[1, 0, 1])
        return TransNormerLLMConfig(**fields, **overrides)
    return TransNormerLLMConfig.from_preset("1B", **overrides)


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    with torch.device(DEVICE):
        return TransNormerLLMForCausalLM(_config()).state_dict()


def _model(weights, backend: str, dtype: torch.dtype, **overrides) -> TransNormerLLMForCausalLM:
    """The shared weights in `dtype` on `backend`, in eval mode."""
    with torch.device(DEVICE):
        model = TransNormerLLMForCausalLM(_config(attention_backend=backend, **overrides))
    model.load_state_dict(weights)
    return model.to(dtype).eval()


def _check(name: str, out: torch.Tensor, reference: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype) -> None:
    """The module's tolerance (see the docstring): fp32 against the bound, 16-bit against the torch path."""
    if dtype == torch.float32:
        assert_close_to_ref(name, out, reference, rtol=FP32_BOUND)
    else:
        assert_close_to_ref(name, out, reference, baseline, slack=SLACK[dtype])


def _prefill_then_decode(model, ids: torch.Tensor, following: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefill logits, the logits of each following token fed one at a time through the cache)."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache, steps = getattr(out, CACHE_FIELD), []
        for t in range(following.shape[1]):
            step = model(following[:, t:t + 1], use_cache=True, **{CACHE_FIELD: cache})
            cache = getattr(step, CACHE_FIELD)
            steps.append(step.logits.float())
    return out.logits.float(), torch.cat(steps, dim=1)


@pytest.fixture(scope="module")
def prefill_reference(weights):
    ids = torch.randint(3, _config().vocab_size, (1, PREFILL + DECODE_STEPS), device=DEVICE)
    return ids, _prefill_then_decode(_model(weights, "torch", torch.float32), ids[:, :PREFILL], ids[:, PREFILL:])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@gpu_memory(28)  # peak on the H200: 27 GiB
def test_prefill_and_decode(weights, prefill_reference, dtype):
    ids, (ref_prefill, ref_decode) = prefill_reference
    prompt, following = ids[:, :PREFILL], ids[:, PREFILL:]
    prefill, decode = _prefill_then_decode(_model(weights, "triton", dtype), prompt, following)
    base_prefill, base_decode = _prefill_then_decode(_model(weights, "torch", dtype), prompt, following)
    _check(f"prefill logits at N={PREFILL}", prefill, ref_prefill, base_prefill, dtype)
    _check("decode-step logits", decode, ref_decode, base_decode, dtype)


def _left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, the second shorter by PAD tokens and left-padded (pad id 0)."""
    ids = torch.randint(3, _config().vocab_size, (2, PROMPT), device=DEVICE)
    mask = torch.ones_like(ids)
    ids[1, :PAD], mask[1, :PAD] = 0, 0
    return ids, mask


@pytest.mark.parametrize("cache", ["default", "static"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@gpu_memory(20)  # peak on the H200: 18 GiB
def test_generate_on_a_left_padded_batch(weights, dtype, cache):
    """Greedy generate(): each token is the argmax of the logits generate() returns, and those logits are the
    reference's on the generated text, each row run alone without padding (teacher-forced, one forward). On CUDA the
    static cache compiles the decode step (CUDA graphs), as users get it."""
    ids, mask = _left_padded_batch()
    model = _model(weights, "triton", dtype)
    extra = {} if cache == "default" else {"cache_implementation": "static"}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             return_dict_in_generate=True, output_logits=True, **extra)
    logits = torch.stack(out.logits, dim=1).float()  # (B, NEW_TOKENS, V)
    assert torch.isfinite(logits).all(), f"{cache} generate() returned non-finite logits"
    assert torch.equal(out.sequences[:, PROMPT:], logits.argmax(-1)), "a greedy token is not its logits' argmax"
    reference, baseline = _model(weights, "torch", torch.float32), _model(weights, "torch", dtype)
    for row in range(2):
        text = out.sequences[row:row + 1, PAD * row:]  # the row without its padding
        with torch.no_grad():
            ref = reference(text[:, :-1]).logits[0, -NEW_TOKENS:].float()
            base = baseline(text[:, :-1]).logits[0, -NEW_TOKENS:].float()
        _check(f"{cache} generate() logits, row {row}", logits[row], ref, base, dtype)


@gpu_memory(14)
def test_graph_decoding_gives_transformers_tokens(weights, monkeypatch):
    """generate()'s CUDA-graph loop against transformers' loop (`cuda_graph_decoding=False`) in fp32, where the tokens
    must be identical: greedy on a left-padded batch with an end token that stops one row early (the late stop
    check), seeded sampling with two sequences per prompt, and a returned cache, whose states must be the same."""
    monkeypatch.setattr(decoding_transnormer, "GRAPH_DEVICE_TYPES", ("cuda", "cpu"))  # the dry run takes it too
    captured, finish = [], GraphedDecodeStep.finish
    monkeypatch.setattr(GraphedDecodeStep, "finish", lambda step: (captured.append(step.graph is not None),
                                                                  finish(step)))
    ids, mask = _left_padded_batch()
    model = _model(weights, "triton", torch.float32)

    def both(**kwargs):
        runs = []
        for graphs in (False, True):
            model.config.cuda_graph_decoding = graphs
            torch.manual_seed(1)
            with torch.no_grad():
                runs.append(model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, **kwargs))
        return runs

    theirs, ours = both(do_sample=False, eos_token_id=None)
    assert torch.equal(ours, theirs)
    eos = int(theirs[0, PROMPT])  # row 0's first new token ends it
    theirs, ours = both(do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours, theirs) and (ours[0, PROMPT + 1:] == 0).all(), "row 0 did not stop at its end token"
    theirs, ours = both(do_sample=True, top_p=0.9, num_return_sequences=2, eos_token_id=None)
    assert torch.equal(ours, theirs) and not torch.equal(ours[0], ours[1])
    theirs, ours = both(do_sample=False, eos_token_id=None, return_dict_in_generate=True)
    assert torch.equal(ours.sequences, theirs.sequences)
    for layer, reference in zip(getattr(ours, CACHE_FIELD).layers, getattr(theirs, CACHE_FIELD).layers):
        torch.testing.assert_close(layer.state, reference.state, rtol=1e-6, atol=1e-6)
    assert captured == [DEVICE.type == "cuda"] * 4, "the graph loop did not run, or did not capture its step"


def _loss_and_grads(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    wide = torch.float64 if loss.dtype == torch.float64 else torch.float32
    return loss.detach().to(wide), {name: p.grad.to(wide) for name, p in model.named_parameters()}


# Gradients compared: the tied embedding / head, and the first (LRPE) and last layers' token and channel mixers.
GRADS = ("model.embed_tokens.weight", "model.layers.0.token_mixer.qkvu_proj.weight",
         "model.layers.0.token_mixer.lrpe.theta", "model.layers.0.channel_mixer.l1.weight",
         "model.layers.{last}.token_mixer.out_proj.weight", "model.layers.{last}.channel_mixer.l3.weight")


@pytest.fixture(scope="module")
def loss_reference(weights):
    """The float64 torch path's full-logits loss and the GRADS gradients (a float64 TNL-1B: 48 GiB)."""
    ids = torch.randint(3, _config().vocab_size, (1, LOSS_TOKENS), device=DEVICE)
    names = [name.format(last=_config().num_hidden_layers - 1) for name in GRADS]
    with gpu_memory_share(48):
        loss, grads = _loss_and_grads(_model(weights, "torch", torch.float64), ids)
        grads = {name: grads[name] for name in names}
    return ids, loss, grads


@pytest.mark.parametrize("dtype", [pytest.param(dtype, marks=[pytest.mark.xdist_group("model-loss"), gpu_memory(48)])
                                   for dtype in DTYPES], ids=dtype_name)
def test_chunked_loss_and_gradient_checkpointing(weights, loss_reference, dtype):
    """Training forward + backward on Triton with the chunked loss (4 chunks, no full logits), with and without
    gradient checkpointing, against the float64 full-logits loss, with the torch path's full-logits run in the same
    dtype as the baseline. Checkpointing recomputes the same kernels, so its loss must equal the plain run's exactly."""
    ids, ref_loss, ref_grads = loss_reference
    baseline_loss, baseline_grads = _loss_and_grads(_model(weights, "torch", dtype), ids)
    model = _model(weights, "triton", dtype, loss_chunk_size=LOSS_CHUNK)
    runs = {"plain": _loss_and_grads(model, ids)}
    calls = []
    model.model.layers[0].token_mixer.register_forward_hook(lambda *_: calls.append(1))
    model.gradient_checkpointing_enable()
    runs["checkpointed"] = _loss_and_grads(model, ids)
    assert len(calls) == 2, "with checkpointing the layer's forward must run again in backward"
    assert torch.equal(runs["checkpointed"][0], runs["plain"][0]), "checkpointing changed the loss"
    for run, (loss, grads) in runs.items():
        assert_close_to_ref(f"{run} chunked loss", loss, ref_loss, baseline_loss, slack=SLACK[dtype])
        for name, ref in ref_grads.items():
            assert_close_to_ref(f"{run} grad {name}", grads[name], ref, baseline_grads[name], slack=SLACK[dtype])
