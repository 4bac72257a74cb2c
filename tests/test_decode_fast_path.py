"""The decode fast path: eager steps call the Triton launchers without operator dispatch, traced steps keep the
operators (fake implementations), and every generate() strategy gives the default path's tokens through it.

The Triton kernels run in the interpreter (TRITON_INTERPRET=1, fp32) and torch.compile with the "aot_eager"
backend, the CPU stand-in for the CUDA-graph step that generate(cache_implementation="static") compiles.
"""

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig, PreTrainedTokenizerFast, TextStreamer

from conftest import tiny_config
from transnormer_hf import TransNormerLLMCache, TransNormerLLMForCausalLM, TransNormerLLMStaticCache
from transnormer_hf.modeling_transnormer import CACHE_FIELD

NEW_TOKENS = 6


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


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


# ---- every generate() strategy: the fast path (static cache, compiled step) gives the default path's tokens ----

def _fast(**kwargs) -> dict:
    """generate() arguments of the fast path, compiled with aot_eager (generate compiles on CUDA by itself)."""
    config = CompileConfig(backend="aot_eager", fullgraph=True, mode=None)
    config._compile_all_devices = True  # generate()'s own switch for compiling off accelerators
    return dict(cache_implementation="static", compile_config=config, **kwargs)


def _both(model, ids, compiled: bool = True, **kwargs):
    """(default-path ids, fast-path ids) of the same greedy-by-default generate() call; the fast one compiled once
    (or, `compiled=False`, for strategies whose loop generate() never compiles, not at all: the eager static cache)."""
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, **kwargs)
    default = model.generate(ids, **kwargs)
    with torch._dynamo.config.patch(error_on_recompile=True):
        fast = model.generate(ids, **_fast(**kwargs))
    assert counters["stats"]["unique_graphs"] == int(compiled), "the compiled step ran where it should not, or not"
    return default, fast


def test_fast_greedy_is_the_default_greedy(triton_model):
    default, fast = _both(triton_model, torch.randint(3, 48, (2, 5)))
    assert torch.equal(fast, default)
    assert len(set(default[0, 5:].tolist())) > 1


def test_fast_sampling_with_a_seed_is_the_default_sampling(tiny_model):
    prompt = torch.randint(3, 48, (2, 5))
    sampling = dict(max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, temperature=0.8, eos_token_id=None)
    torch.manual_seed(3)
    default = tiny_model.generate(prompt, **sampling)
    torch.manual_seed(3)
    fast = tiny_model.generate(prompt, **_fast(**sampling))
    assert torch.equal(fast, default)


def test_fast_beams_with_several_returned_sequences_fall_back_to_the_eager_static_cache(tiny_model):
    # transformers' beam search never compiles the step: the static cache then decodes eagerly, reordered in place.
    default, fast = _both(tiny_model, torch.randint(3, 48, (2, 5)), compiled=False, num_beams=3, num_return_sequences=2)
    assert fast.shape[0] == 4 and torch.equal(fast, default)


def test_fast_left_padded_batch(tiny_model):
    prompts = [torch.randint(3, 48, (1, n)) for n in (7, 2)]
    batch = torch.cat([torch.nn.functional.pad(p, (7 - p.shape[1], 0), value=0) for p in prompts])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(p), (7 - p.shape[1], 0)) for p in prompts])
    default, fast = _both(tiny_model, batch, attention_mask=mask)
    assert torch.equal(fast, default)


def test_fast_repetition_penalty(tiny_model):
    prompt = torch.randint(3, 48, (1, 5))
    default, fast = _both(tiny_model, prompt, repetition_penalty=1.8)
    assert torch.equal(fast, default)
    assert not torch.equal(default, tiny_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False,
                                                          eos_token_id=None)), "the penalty changed nothing"


@pytest.fixture
def word_tokenizer():
    from tokenizers import Tokenizer, decoders, models

    # One character per token (stop strings are matched on the characters of the tokens).
    characters = "abcdefghijklmnopqrstuvwxyz0123456789 .,!?-:;"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i for i, c in enumerate(characters, start=3)}}
    backend = Tokenizer(models.BPE(vocab, merges=[], unk_token="<pad>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_fast_stop_strings(tiny_model, word_tokenizer):
    prompt = word_tokenizer("tnl", return_tensors="pt").input_ids
    unstopped = tiny_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    stop = word_tokenizer.decode(unstopped[0, 3:6])  # the first three new characters
    default, fast = _both(tiny_model, prompt, stop_strings=[stop], tokenizer=word_tokenizer)
    assert torch.equal(fast, default)
    assert torch.equal(default, unstopped[:, :6]), "generation did not stop at the stop string"


def test_fast_streaming_prints_the_default_text(tiny_model, word_tokenizer, capsys):
    prompt = word_tokenizer("tnl", return_tensors="pt").input_ids
    default, fast = _both(tiny_model, prompt, streamer=TextStreamer(word_tokenizer, skip_prompt=True))
    printed = capsys.readouterr().out
    assert torch.equal(fast, default)
    text = word_tokenizer.decode(default[0, 3:])
    assert printed == f"{text}\n{text}\n", (printed, text)


def test_fast_continuing_from_the_returned_cache_is_one_long_default_generate(triton_model):
    prompt = torch.randint(3, 48, (1, 5))
    greedy = dict(do_sample=False, eos_token_id=None)
    whole = triton_model.generate(prompt, max_new_tokens=2 * NEW_TOKENS, **greedy)
    first = triton_model.generate(prompt, max_new_tokens=NEW_TOKENS, return_dict_in_generate=True, **_fast(**greedy))
    cache = getattr(first, CACHE_FIELD)
    assert isinstance(cache, TransNormerLLMStaticCache)
    second = triton_model.generate(first.sequences, max_new_tokens=NEW_TOKENS, compile_config=_fast()["compile_config"],
                                   **greedy, **{CACHE_FIELD: cache})
    assert torch.equal(second, whole)


def test_the_static_cache_falls_back_without_error(triton_model):
    """Uncompiled (no compile_config off CUDA: the eager in-place step) and without a cache, the tokens stay."""
    prompt = torch.randint(3, 48, (2, 5))
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    default = triton_model.generate(prompt, **greedy)
    eager_static = triton_model.generate(prompt, cache_implementation="static", return_dict_in_generate=True, **greedy)
    assert counters["stats"]["unique_graphs"] == 0
    assert isinstance(getattr(eager_static, CACHE_FIELD), TransNormerLLMStaticCache)
    assert torch.equal(eager_static.sequences, default)
    no_cache = triton_model.generate(prompt, cache_implementation="static", use_cache=False, **greedy)
    assert torch.equal(no_cache, default)
