"""The static cache: a compiled decode step that is traced once and replayed, equal to eager decoding.

torch.compile runs with the "aot_eager" backend (AOTAutograd tracing as inductor does, without its C++ build time),
so these checks cover tracing, guards and recompilation, not inductor's code generation.
"""

import pytest
import torch
from torch._dynamo.utils import counters
from conftest import REPO
from transformers import CompileConfig

from transnormer_hf import TransNormerLLMCache, TransNormerLLMStaticCache
from transnormer_hf.modeling_transnormer import CACHE_FIELD

NEW_TOKENS = 6


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _compile_config() -> CompileConfig:
    config = CompileConfig(backend="aot_eager", fullgraph=True, mode=None)
    config._compile_all_devices = True  # generate() compiles only on accelerators unless told to (its test hook)
    return config


def _generate_both_ways(model, ids, **kwargs):
    """(default-mode ids, static-mode output with its cache) of the same generate call."""
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, **kwargs)
    default = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", compile_config=_compile_config(),
                            return_dict_in_generate=True, **kwargs)
    return default, static


def test_compiled_decode_steps_equal_eager_and_compile_once(tiny_model):
    prompt = torch.randint(3, 48, (2, 5))
    eager_cache, static_cache = TransNormerLLMCache(tiny_model.config), TransNormerLLMStaticCache(tiny_model.config)
    compiled = torch.compile(tiny_model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager_logits = tiny_model(prompt, cache=eager_cache, use_cache=True).logits[:, -1]
        static_logits = tiny_model(prompt, cache=static_cache, use_cache=True).logits[:, -1]  # the eager prefill
        torch.testing.assert_close(static_logits, eager_logits, rtol=0, atol=0)
        addresses = [layer.state.data_ptr() for layer in static_cache.layers]
        with torch._dynamo.config.patch(error_on_recompile=True):
            for step in range(4):
                token = eager_logits.argmax(-1, keepdim=True)
                eager_logits = tiny_model(token, cache=eager_cache, use_cache=True).logits[:, -1]
                static_logits = compiled(token, cache=static_cache, use_cache=True).logits[:, -1]
                torch.testing.assert_close(static_logits, eager_logits, rtol=1e-5, atol=1e-6, msg=f"step {step}")
                assert static_cache.seen_tokens == eager_cache.seen_tokens == 6 + step
                for ours, theirs in zip(static_cache.layers, eager_cache.layers):
                    torch.testing.assert_close(ours.state, theirs.state, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1  # one trace for every position: no guard on the token count
    assert [layer.state.data_ptr() for layer in static_cache.layers] == addresses  # updated in place


def test_static_cache_reorders_and_resets_in_place(tiny_model):
    cache = TransNormerLLMStaticCache(tiny_model.config)
    with torch.no_grad():
        tiny_model(torch.randint(3, 48, (3, 4)), cache=cache, use_cache=True)
    before = [layer.state.clone() for layer in cache.layers]
    addresses = [layer.state.data_ptr() for layer in cache.layers]
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    for layer, old in zip(cache.layers, before):
        torch.testing.assert_close(layer.state, old[[2, 2, 0]], rtol=0, atol=0)
    cache.reset()
    assert cache.seen_tokens == 0
    assert all(not layer.state.any() for layer in cache.layers)
    assert [layer.state.data_ptr() for layer in cache.layers] == addresses
    with torch.no_grad(), pytest.raises(ValueError, match=r"initial_state must have shape \(2, .* got \(3, "):
        tiny_model(torch.randint(3, 48, (2, 4)), cache=cache, use_cache=True)


def test_static_generate_compiles_once_and_equals_default_greedy(tiny_model):
    prompt = torch.randint(3, 48, (1, 7))
    with torch._dynamo.config.patch(error_on_recompile=True):
        default, static = _generate_both_ways(tiny_model, prompt)
    assert isinstance(getattr(static, CACHE_FIELD), TransNormerLLMStaticCache)
    assert counters["stats"]["unique_graphs"] == 1  # the decode step went through torch.compile, once
    assert torch.equal(static.sequences, default)


def test_static_generate_equals_default_when_sampling(tiny_model):
    prompt = torch.randint(3, 48, (2, 5))
    torch.manual_seed(1)
    default = tiny_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, eos_token_id=None)
    torch.manual_seed(1)
    static = tiny_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, eos_token_id=None,
                                 cache_implementation="static", compile_config=_compile_config())
    assert torch.equal(static, default)


def test_static_generate_equals_default_on_a_left_padded_batch(tiny_model):
    prompts = [torch.randint(3, 48, (1, n)) for n in (8, 3, 1)]
    width = max(p.shape[1] for p in prompts)
    batch = torch.cat([torch.nn.functional.pad(p, (width - p.shape[1], 0), value=0) for p in prompts])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(p), (width - p.shape[1], 0)) for p in prompts])
    default, static = _generate_both_ways(tiny_model, batch, attention_mask=mask)
    assert torch.equal(static.sequences, default)
    for row, single in enumerate(prompts):  # and padding changed nothing
        alone = tiny_model.generate(single, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
        assert torch.equal(static.sequences[row, width:], alone[0, single.shape[1]:]), f"row {row}"


def test_static_generate_equals_default_with_beams(tiny_model):
    prompt = torch.randint(3, 48, (2, 5))
    default, static = _generate_both_ways(tiny_model, prompt, num_beams=3, num_return_sequences=2)
    assert torch.equal(static.sequences, default)
    assert getattr(static, CACHE_FIELD).layers[0].state.shape[0] == 6  # batch x beams, reordered in place


def test_continuing_from_a_returned_static_cache_equals_one_long_generate(tiny_model):
    prompt = torch.randint(3, 48, (1, 7))
    whole = tiny_model.generate(prompt, max_new_tokens=2 * NEW_TOKENS, do_sample=False, eos_token_id=None)
    _, first = _generate_both_ways(tiny_model, prompt)
    cache = getattr(first, CACHE_FIELD)
    assert cache.get_seq_length() == first.sequences.shape[1] - 1  # the last token is not fed yet
    second = tiny_model.generate(first.sequences, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                 compile_config=_compile_config(), **{CACHE_FIELD: cache})
    assert torch.equal(second, whole)


def test_static_cache_with_a_user_cache_is_the_standard_error(tiny_model):
    with pytest.raises(ValueError, match="cache_implementation"):
        tiny_model.generate(torch.randint(3, 48, (1, 4)), max_new_tokens=2, cache_implementation="static",
                            **{CACHE_FIELD: TransNormerLLMStaticCache(tiny_model.config)})


def test_default_generate_keeps_the_eager_cache(tiny_model):
    out = tiny_model.generate(torch.randint(3, 48, (1, 4)), max_new_tokens=2, return_dict_in_generate=True)
    cache = getattr(out, CACHE_FIELD)
    assert type(cache) is TransNormerLLMCache and not cache.is_compileable
    assert TransNormerLLMStaticCache(tiny_model.config).is_compileable


def test_on_cpu_generate_does_not_compile_even_with_a_compile_config_as_the_readme_says(tiny_model):
    """The README used to say that off CUDA a compile_config makes generate() compile; transformers compiles only on
    accelerators and skips it on a CPU (issue 21, item 10). What the README says now is what happens."""
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "On a CPU, `generate` does not compile, with or without a `compile_config`" in readme
    prompt = torch.randint(3, 48, (1, 7))
    default = tiny_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    static = tiny_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                 cache_implementation="static", return_dict_in_generate=True,
                                 compile_config=CompileConfig(backend="aot_eager", fullgraph=True, mode=None))
    assert isinstance(getattr(static, CACHE_FIELD), TransNormerLLMStaticCache)
    assert counters["stats"]["unique_graphs"] == 0  # nothing went through torch.compile
    assert torch.equal(static.sequences, default)
