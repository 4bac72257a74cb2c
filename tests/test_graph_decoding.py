"""generate()'s CUDA-graph decoding loop (`decode_with_cuda_graphs`) against transformers' own loop, strategy by
strategy. On CPU the loop runs every step eagerly, the stand-in for the replayed graph: what is tested here is the
loop (processors, sampling, padding, the late stop check and what it drops, the returned cache); the capture itself
is checked on the GPU (tests/gpu/test_gpu_model.py)."""

import pytest
import torch
from transformers import TextStreamer, pipeline

from conftest import tiny_config
from test_decode_fast_path import word_tokenizer  # noqa: F401 (a fixture)
from transnormer_hf import TransNormerLLMCache
from transnormer_hf import decoding_transnormer
from transnormer_hf.decoding_transnormer import GraphedDecodeStep, decode_with_cuda_graphs
from transnormer_hf.modeling_transnormer import CACHE_FIELD

NEW_TOKENS = 8
GREEDY = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)


@pytest.fixture(autouse=True)
def graph_steps(monkeypatch) -> list:
    """generate() decides as on CUDA (its steps then run eagerly here); the list gets one entry per graph loop run."""
    monkeypatch.setattr(decoding_transnormer, "GRAPH_DEVICE_TYPES", ("cuda", "cpu"))
    runs, original = [], GraphedDecodeStep.__init__

    def counting_init(self, *args, **kwargs):
        runs.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(GraphedDecodeStep, "__init__", counting_init)
    return runs


def _both(model, ids, graph_steps: list, takes_graphs: bool = True, **kwargs):
    """(transformers' loop, generate()'s choice, which should be the graph loop) for the same generate() call."""
    model.config.cuda_graph_decoding = False
    theirs = model.generate(ids, **kwargs)
    assert not graph_steps
    model.config.cuda_graph_decoding = True
    ours = model.generate(ids, **kwargs)
    assert len(graph_steps) == int(takes_graphs), "generate() did not take the loop it should have"
    return theirs, ours


def _count_forwards(model) -> list:
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def test_greedy(tiny_model, graph_steps):
    theirs, ours = _both(tiny_model, torch.randint(3, 48, (2, 5)), graph_steps, **GREEDY)
    assert torch.equal(ours, theirs)
    assert len(set(theirs[0, 5:].tolist())) > 1


def test_sampling_with_a_seed_and_several_sequences_per_prompt(tiny_model, graph_steps):
    prompt = torch.randint(3, 48, (2, 5))
    sampling = dict(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=0.9, top_k=20, top_p=0.9,
                    num_return_sequences=3, eos_token_id=None)
    torch.manual_seed(3)
    tiny_model.config.cuda_graph_decoding = False
    theirs = tiny_model.generate(prompt, **sampling)
    torch.manual_seed(3)
    tiny_model.config.cuda_graph_decoding = True
    ours = tiny_model.generate(prompt, **sampling)
    assert graph_steps and ours.shape == (6, 5 + NEW_TOKENS) and torch.equal(ours, theirs)
    assert not torch.equal(ours[0], ours[1]), "the three samples of a prompt are identical: sampling did not sample"


def test_left_padded_batch(tiny_model, graph_steps):
    prompts = [torch.randint(3, 48, (1, n)) for n in (7, 2)]
    batch = torch.cat([torch.nn.functional.pad(p, (7 - p.shape[1], 0), value=0) for p in prompts])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(p), (7 - p.shape[1], 0)) for p in prompts])
    theirs, ours = _both(tiny_model, batch, graph_steps, attention_mask=mask, **GREEDY)
    assert torch.equal(ours, theirs)
    alone = tiny_model.generate(prompts[1], **GREEDY)
    assert torch.equal(ours[1, 7:], alone[0, 2:]), "the padded row is not the prompt alone"


def test_repetition_penalty(tiny_model, graph_steps):
    prompt = torch.randint(3, 48, (1, 5))
    theirs, ours = _both(tiny_model, prompt, graph_steps, repetition_penalty=1.8, **GREEDY)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, tiny_model.generate(prompt, **GREEDY)), "the penalty changed nothing"


def _eos_of_row_0(model, prompt) -> int:
    """A token that row 0's greedy continuation reaches first at its third new token."""
    free = model.generate(prompt, **GREEDY)[:, prompt.shape[1]:]
    token = int(free[0, 2])
    assert token not in free[0, :2].tolist()
    return token


def test_eos_stops_rows_separately_and_the_late_check_drops_only_its_extra_step(tiny_model, graph_steps):
    prompt = torch.randint(3, 48, (2, 5))
    kwargs = dict(GREEDY, eos_token_id=_eos_of_row_0(tiny_model, prompt), pad_token_id=0)
    graph_steps.clear()
    theirs, ours = _both(tiny_model, prompt, graph_steps, **kwargs)
    assert torch.equal(ours, theirs)
    assert ours[0, 7] == kwargs["eos_token_id"] and (ours[0, 8:] == 0).all(), "row 0 did not stop at its end token"
    # One row that stops before max_new_tokens: the late check runs one step more, whose token it drops.
    calls = _count_forwards(tiny_model)
    tiny_model.config.cuda_graph_decoding = False
    theirs = tiny_model.generate(prompt[:1], **kwargs)
    theirs_forwards = len(calls)
    calls.clear()
    tiny_model.config.cuda_graph_decoding = True
    ours = tiny_model.generate(prompt[:1], **kwargs)
    assert torch.equal(ours, theirs) and ours.shape[1] == 8
    assert len(calls) == theirs_forwards + 1 == 4, (theirs_forwards, len(calls))


def test_a_returned_cache_is_exact_and_continues_like_one_long_generate(tiny_model, graph_steps):
    prompt = torch.randint(3, 48, (1, 5))
    kwargs = dict(GREEDY, eos_token_id=_eos_of_row_0(tiny_model, prompt), pad_token_id=0,
                  return_dict_in_generate=True, output_scores=True, output_logits=True)
    graph_steps.clear()
    theirs, ours = _both(tiny_model, prompt, graph_steps, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences) and ours.sequences.shape[1] == 8
    for name in ("scores", "logits"):
        assert len(getattr(ours, name)) == len(getattr(theirs, name)) == 3
        for mine, reference in zip(getattr(ours, name), getattr(theirs, name)):
            torch.testing.assert_close(mine, reference, rtol=0, atol=0)
    cache, reference = getattr(ours, CACHE_FIELD), getattr(theirs, CACHE_FIELD)
    assert isinstance(cache, TransNormerLLMCache) and cache.seen_tokens == reference.seen_tokens == 7
    for layer, reference_layer in zip(cache.layers, reference.layers):
        torch.testing.assert_close(layer.state, reference_layer.state, rtol=0, atol=0)
    # A user's cache carried across calls: the graph loop's two halves are transformers' one long generation.
    tiny_model.config.cuda_graph_decoding = False
    whole = tiny_model.generate(prompt, max_new_tokens=2 * NEW_TOKENS, do_sample=False, eos_token_id=None)
    tiny_model.config.cuda_graph_decoding = True
    user_cache = TransNormerLLMCache(tiny_model.config)
    first = tiny_model.generate(prompt, **GREEDY, **{CACHE_FIELD: user_cache})
    second = tiny_model.generate(first, **GREEDY, **{CACHE_FIELD: user_cache})
    assert torch.equal(second, whole) and len(graph_steps) == 3


def test_stop_strings_take_transformers_loop(tiny_model, word_tokenizer, graph_steps):
    # transformers hands no tokenizer to a custom loop's stopping criteria: this call keeps its own loop.
    prompt = word_tokenizer("tnl", return_tensors="pt").input_ids
    unstopped = tiny_model.generate(prompt, **GREEDY)
    graph_steps.clear()
    stop = word_tokenizer.decode(unstopped[0, 3:6])
    theirs, ours = _both(tiny_model, prompt, graph_steps, takes_graphs=False, stop_strings=[stop],
                         tokenizer=word_tokenizer, **GREEDY)
    assert torch.equal(ours, theirs) and torch.equal(ours, unstopped[:, :6])


def test_a_tokenizer_without_stop_strings_keeps_the_graph_loop(tiny_model, word_tokenizer, graph_steps):
    prompt = word_tokenizer("tnl", return_tensors="pt").input_ids
    theirs, ours = _both(tiny_model, prompt, graph_steps, tokenizer=word_tokenizer, **GREEDY)
    assert torch.equal(ours, theirs)


def test_one_new_token_and_the_text_generation_pipeline(tiny_model, word_tokenizer, graph_steps):
    prompt = torch.randint(3, 48, (2, 5))
    theirs, ours = _both(tiny_model, prompt, graph_steps, max_new_tokens=1, do_sample=False, eos_token_id=None)
    assert ours.shape == (2, 6) and torch.equal(ours, theirs)
    graph_steps.clear()
    generator = pipeline("text-generation", model=tiny_model, tokenizer=word_tokenizer)
    text = "tnl decodes"
    tiny_model.config.cuda_graph_decoding = False
    theirs = generator(text, max_new_tokens=NEW_TOKENS, do_sample=False, return_tensors=True)[0]
    tiny_model.config.cuda_graph_decoding = True
    ours = generator(text, max_new_tokens=NEW_TOKENS, do_sample=False, return_tensors=True)[0]
    assert graph_steps and ours["generated_token_ids"] == theirs["generated_token_ids"]


def test_streaming_prints_what_it_returns(tiny_model, word_tokenizer, capsys, graph_steps):
    prompt = word_tokenizer("tnl", return_tensors="pt").input_ids
    theirs, ours = _both(tiny_model, prompt, graph_steps, streamer=TextStreamer(word_tokenizer, skip_prompt=True),
                         **GREEDY)
    assert torch.equal(ours, theirs)
    text = word_tokenizer.decode(ours[0, 3:])
    assert capsys.readouterr().out == f"{text}\n{text}\n"


def test_the_static_cache(tiny_model, graph_steps):
    theirs, ours = _both(tiny_model, torch.randint(3, 48, (2, 5)), graph_steps, cache_implementation="static",
                         **GREEDY)
    assert torch.equal(ours, theirs)


def test_without_a_cache_the_loop_hands_over_to_transformers(tiny_model, graph_steps):
    theirs, ours = _both(tiny_model, torch.randint(3, 48, (2, 5)), graph_steps, takes_graphs=False, use_cache=False,
                         **GREEDY)
    assert torch.equal(ours, theirs)


def test_beams_keep_transformers_loop_and_the_graph_loop_refuses_them(tiny_model, graph_steps):
    theirs, ours = _both(tiny_model, torch.randint(3, 48, (2, 5)), graph_steps, takes_graphs=False, num_beams=3,
                         num_return_sequences=2, **GREEDY)
    assert torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="num_beams=3"):
        tiny_model.generate(torch.randint(3, 48, (1, 5)), custom_generate=decode_with_cuda_graphs, num_beams=3,
                            **GREEDY)


def test_generate_picks_the_graph_loop_for_greedy_and_sampling_on_cuda_only(tiny_model, monkeypatch):
    decides = tiny_model._decodes_with_cuda_graphs
    assert decides(None, {}) and decides(None, dict(do_sample=True, top_p=0.9))
    assert not decides(None, dict(num_beams=3))
    assert not decides(None, dict(prompt_lookup_num_tokens=3))
    assert not decides(None, dict(stop_strings=["."])) and not decides(None, dict(token_healing=True))
    tiny_model.config.cuda_graph_decoding = False
    assert not decides(None, {})
    tiny_model.config.cuda_graph_decoding = True
    monkeypatch.setattr(decoding_transnormer, "GRAPH_DEVICE_TYPES", ("cuda",))
    assert not decides(None, {}), "chose the CUDA-graph loop on CPU"


def test_the_switch_is_checked():
    with pytest.raises(ValueError, match="cuda_graph_decoding must be True or False"):
        tiny_config(cuda_graph_decoding="yes")
