"""The decode fast path: eager steps call the Triton launchers without operator dispatch, traced steps keep the
operators (fake implementations), and every generate() strategy gives the default path's tokens through it.

The Triton kernels run in the interpreter (TRITON_INTERPRET=1, fp32) and torch.compile with the "aot_eager"
backend, the CPU stand-in for the CUDA-graph step that generate(cache_implementation="static") compiles.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import tiny_config
from transnormer_hf import TransNormerLLMCache, TransNormerLLMForCausalLM, TransNormerLLMStaticCache


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def triton_model():
    torch.manual_seed(0)
    return TransNormerLLMForCausalLM(tiny_config(attention_backend="triton")).eval()


def _operators_called(fn) -> set[str]:
    """Names of this package's torch.library operators that `fn()` dispatched to."""
    with torch.profiler.profile() as profiler:
        fn()
    return {event.key for event in profiler.key_averages() if event.key.startswith("transnormer_hf::")}


def test_an_eager_decode_step_calls_no_operator(triton_model):
    cache = TransNormerLLMCache(triton_model.config)
    with torch.no_grad():
        triton_model(torch.randint(3, 48, (2, 5)), cache=cache, use_cache=True)
        called = _operators_called(lambda: triton_model(torch.randint(3, 48, (2, 1)), cache=cache, use_cache=True))
    assert called == set(), "the eager step went through torch.library dispatch"


def test_training_keeps_autograd_through_the_operators(triton_model):
    ids = torch.randint(3, 48, (2, 6))
    called = _operators_called(lambda: triton_model(ids, labels=ids, use_cache=False).loss.backward())
    assert {"transnormer_hf::srms_norm_fwd", "transnormer_hf::srms_norm_bwd"} <= called
    reference = TransNormerLLMForCausalLM(tiny_config(attention_backend="torch")).eval()
    reference.load_state_dict(triton_model.state_dict())
    reference(ids, labels=ids, use_cache=False).loss.backward()
    for (name, ours), theirs in zip(triton_model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_compiled_triton_decode_step_traces_the_operators_and_equals_eager(triton_model):
    prompt = torch.randint(3, 48, (2, 5))
    eager_cache, static_cache = TransNormerLLMCache(triton_model.config), TransNormerLLMStaticCache(triton_model.config)
    compiled = torch.compile(triton_model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager_logits = triton_model(prompt, cache=eager_cache, use_cache=True).logits[:, -1]
        triton_model(prompt, cache=static_cache, use_cache=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for step in range(3):
                token = eager_logits.argmax(-1, keepdim=True)
                eager_logits = triton_model(token, cache=eager_cache, use_cache=True).logits[:, -1]
                static_logits = compiled(token, cache=static_cache, use_cache=True).logits[:, -1]
                torch.testing.assert_close(static_logits, eager_logits, rtol=1e-5, atol=1e-6, msg=f"step {step}")
    assert counters["stats"]["unique_graphs"] == 1
