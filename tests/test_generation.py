"""generate() with the recurrent cache: every standard strategy against a hand-written equivalent."""

import itertools

import pytest
import torch
from transformers import PreTrainedTokenizerFast, TextStreamer, pipeline

from checks import rel_err
from conftest import tiny_config
from transnormer_hf import TransNormerLLMCache, TransNormerLLMForCausalLM
from transnormer_hf.modeling_transnormer import CACHE_FIELD

NEW_TOKENS = 8


def _cache_of(output):
    return getattr(output, CACHE_FIELD)


@pytest.fixture
def prompt():
    return torch.randint(3, 48, (1, 7))


def _greedy_loop(model, ids, steps):
    """argmax decoding written out by hand: prefill once, then one token at a time on the cache."""
    cache = TransNormerLLMCache(model.config)
    with torch.no_grad():
        logits = model(ids, cache=cache, use_cache=True).logits[:, -1]
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
            logits = model(token, cache=cache, use_cache=True).logits[:, -1]
    return ids


def test_greedy_equals_a_manual_argmax_loop(tiny_model, prompt):
    out = tiny_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    assert torch.equal(out, _greedy_loop(tiny_model, prompt, NEW_TOKENS))
    assert len(set(out[0, 7:].tolist())) > 1, "a degenerate repeat would not exercise the cache"


def test_greedy_equals_recomputing_the_whole_prefix(tiny_model, prompt):
    ids = prompt
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids = torch.cat([ids, tiny_model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    out = tiny_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    assert torch.equal(out, ids)


def test_two_calls_give_identical_ids(tiny_model, prompt):
    first = tiny_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    second = tiny_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(first, second)


def test_one_beam_equals_greedy(tiny_model, prompt):
    greedy = tiny_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    beam = tiny_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1, eos_token_id=None)
    assert torch.equal(greedy, beam)


@pytest.fixture
def four_token_model():
    torch.manual_seed(1)
    # No pad id: a zeroed pad embedding row makes continuations after it tie exactly, and ties have no order.
    config = tiny_config(vocab_size=4, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    return TransNormerLLMForCausalLM(config).eval()


def _sequence_log_prob(model, prompt, continuation):
    ids = torch.cat([prompt, torch.tensor([continuation])], dim=1)
    with torch.no_grad():
        log_probs = model(ids, use_cache=False).logits.double().log_softmax(-1)
    positions = range(prompt.shape[1] - 1, ids.shape[1] - 1)
    return sum(log_probs[0, p, ids[0, p + 1]].item() for p in positions)


def test_four_beams_find_the_brute_force_optimum(four_token_model):
    """With 4 beams over a 4-token vocabulary, two steps keep every prefix: the result is the exact optimum."""
    prompt = torch.tensor([[1, 3, 2, 3, 1]])
    beam = four_token_model.generate(prompt, max_new_tokens=2, num_beams=4, do_sample=False, length_penalty=0.0,
                                     num_return_sequences=4)
    every = sorted(itertools.product(range(4), repeat=2),
                   key=lambda c: _sequence_log_prob(four_token_model, prompt, list(c)), reverse=True)
    assert [tuple(row[5:].tolist()) for row in beam] == every[:4]


def test_four_beams_equal_a_hand_written_beam_search(four_token_model):
    """Longer beams reorder the cache at every step: compare with beam search recomputed without a cache."""
    prompt = torch.tensor([[2, 3, 1, 1, 3, 2]])
    steps, width = 5, 4
    beams = [([], 0.0)]
    for _ in range(steps):
        candidates = []
        for tokens, _ in beams:
            for token in range(4):
                candidates.append((tokens + [token], _sequence_log_prob(four_token_model, prompt, tokens + [token])))
        beams = sorted(candidates, key=lambda c: c[1], reverse=True)[:width]
    out = four_token_model.generate(prompt, max_new_tokens=steps, num_beams=width, do_sample=False,
                                    length_penalty=0.0, num_return_sequences=width)
    assert [row[6:].tolist() for row in out] == [tokens for tokens, _ in beams]


def test_continuing_from_the_returned_cache_equals_one_long_generate(tiny_model, prompt):
    whole = tiny_model.generate(prompt, max_new_tokens=2 * NEW_TOKENS, do_sample=False, eos_token_id=None)
    first = tiny_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                return_dict_in_generate=True)
    cache = _cache_of(first)
    assert isinstance(cache, TransNormerLLMCache)
    assert cache.get_seq_length() == first.sequences.shape[1] - 1  # the last token is not fed yet
    second = tiny_model.generate(first.sequences, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                 **{CACHE_FIELD: cache})
    assert torch.equal(second, whole)


def test_multi_token_continuation_on_a_cache_is_exact(tiny_model):
    ids = torch.randint(3, 48, (2, 150))
    with torch.no_grad():
        full = tiny_model(ids, use_cache=False).logits
        cache = TransNormerLLMCache(tiny_model.config)
        parts = [tiny_model(ids[:, a:b], cache=cache, use_cache=True).logits
                 for a, b in ((0, 70), (70, 71), (71, 150))]
    assert rel_err(torch.cat(parts, dim=1), full) < 1e-6
    assert cache.get_seq_length() == 150


def test_each_left_padded_row_equals_the_prompt_alone(tiny_model):
    prompts = [torch.randint(3, 48, (1, n)) for n in (9, 4, 1)]
    width = max(p.shape[1] for p in prompts)
    batch = torch.cat([torch.nn.functional.pad(p, (width - p.shape[1], 0), value=0) for p in prompts])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(p), (width - p.shape[1], 0)) for p in prompts])
    out = tiny_model.generate(batch, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=None)
    for row, single in enumerate(prompts):
        alone = tiny_model.generate(single, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
        assert torch.equal(out[row, width:], alone[0, single.shape[1]:]), f"row {row}"


def test_sampling_is_seeded_and_top_k_one_is_greedy(tiny_model, prompt):
    def sample(**kwargs):
        torch.manual_seed(123)
        return tiny_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=True, eos_token_id=None, **kwargs)

    assert torch.equal(sample(temperature=1.5, top_p=0.9), sample(temperature=1.5, top_p=0.9))
    greedy = tiny_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    assert torch.equal(sample(top_k=1), greedy)


def test_num_return_sequences_expands_the_state(tiny_model, prompt):
    greedy = tiny_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    torch.manual_seed(0)
    out = tiny_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=1, num_return_sequences=3,
                              eos_token_id=None)
    assert out.shape == (3, 7 + NEW_TOKENS)
    assert all(torch.equal(row, greedy[0]) for row in out)


def test_eos_stops_generation(tiny_model, prompt):
    greedy = tiny_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    stop = int(greedy[0, 7 + 2])
    out = tiny_model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stop)
    first_stop = (greedy[0, 7:] == stop).nonzero()[0].item()
    assert torch.equal(out[0], greedy[0, :7 + first_stop + 1])


@pytest.mark.parametrize("strategy", [dict(prompt_lookup_num_tokens=2), dict(assistant_model="self")])
def test_strategies_that_crop_the_cache_say_why(tiny_model, prompt, strategy):
    if strategy.get("assistant_model") == "self":
        strategy = dict(assistant_model=tiny_model)
    with pytest.raises((ValueError, NotImplementedError), match="stateful|recurrent|crop"):
        tiny_model.generate(prompt, max_new_tokens=4, do_sample=False, **strategy)


@pytest.fixture
def word_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 48)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_text_streamer_prints_what_generate_returns(tiny_model, word_tokenizer, capsys):
    ids = word_tokenizer("w5 w9 w30 w7", return_tensors="pt").input_ids
    out = tiny_model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                              streamer=TextStreamer(word_tokenizer, skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed.split() == word_tokenizer.decode(out[0, ids.shape[1]:]).split()


def test_text_generation_pipeline(tiny_model, word_tokenizer):
    generator = pipeline("text-generation", model=tiny_model, tokenizer=word_tokenizer)
    result = generator("w5 w9 w30 w7", max_new_tokens=NEW_TOKENS, do_sample=False, return_tensors=True)[0]
    ids = word_tokenizer("w5 w9 w30 w7", return_tensors="pt").input_ids
    expected = tiny_model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert result["generated_token_ids"] == expected[0].tolist()
    text = generator("w5 w9 w30 w7", max_new_tokens=NEW_TOKENS, do_sample=False)[0]["generated_text"]
    assert text.startswith("w5 w9 w30 w7") and len(text.split()) >= NEW_TOKENS


def test_generate_never_computes_logits_for_the_whole_prompt(tiny_model):
    seen = []
    hook = tiny_model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    try:
        tiny_model.generate(torch.randint(3, 48, (2, 40)), max_new_tokens=3, do_sample=False)
    finally:
        hook.remove()
    assert seen == [1, 1, 1]


def test_prefill_chunking_builds_its_cache_and_equals_no_chunking(tiny_model):
    prompts = [torch.randint(3, 48, (1, n)) for n in (11, 5)]
    batch = torch.cat([torch.nn.functional.pad(p, (11 - p.shape[1], 0), value=0) for p in prompts])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(p), (11 - p.shape[1], 0)) for p in prompts])
    settings = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                    return_dict_in_generate=True, output_logits=True)
    plain = tiny_model.generate(batch, **settings)
    chunked = tiny_model.generate(batch, prefill_chunk_size=4, **settings)  # chunks of 4, 4, 3 tokens
    assert torch.equal(chunked.sequences, plain.sequences)
    assert rel_err(torch.stack(chunked.logits), torch.stack(plain.logits)) < 1e-6


@pytest.mark.parametrize("implementation", ["quantized", "offloaded", "sliding_window"])
def test_cache_implementations_without_keys_and_values_are_refused(tiny_model, prompt, implementation):
    with pytest.raises(ValueError, match=f"cache_implementation='{implementation}' is not supported"):
        tiny_model.generate(prompt, max_new_tokens=2, cache_implementation=implementation)


@pytest.mark.parametrize("layers", [2, 4])
def test_a_cache_of_another_layer_count_is_refused(tiny_model, prompt, layers):
    with pytest.raises(ValueError, match=f"the cache holds {layers} layer states but the model has 3 layers"):
        tiny_model(prompt, cache=TransNormerLLMCache(num_layers=layers), use_cache=True)
