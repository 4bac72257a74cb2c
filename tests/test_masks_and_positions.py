"""Attention masks other than left padding, and position_ids: each row must equal that row run alone, as in Llama."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from checks import rel_err
from conftest import tiny_config
from transnormer_hf import TransNormerLLMCache, TransNormerLLMForCausalLM

PAD = 0


def _tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=48, pad_token_id=PAD)
    return LlamaForCausalLM(config).eval()


def _left_pad(rows, width):
    ids = torch.stack([torch.nn.functional.pad(r, (width - len(r), 0), value=PAD) for r in rows])
    mask = torch.stack([torch.nn.functional.pad(torch.ones_like(r), (width - len(r), 0)) for r in rows])
    return ids, mask


def _chat_continuation(model, first_turns, second_turns, step, llama=False):
    """A batched chat: left-padded first turns on a fresh cache, then second turns of different lengths (the
    shorter row padded between its cached context and its new tokens), then one decode step. Returns the logits of
    the second turns and of the step, and each row's real-token logits of both run alone without padding."""
    ids1, mask1 = _left_pad(first_turns, max(map(len, first_turns)))
    ids2, mask2 = _left_pad(second_turns, max(map(len, second_turns)))
    masks = [mask1, torch.cat([mask1, mask2], 1), torch.cat([mask1, mask2, torch.ones_like(step)], 1)]
    cache = DynamicCache(config=model.config) if llama else TransNormerLLMCache(model.config)
    logits = []
    with torch.no_grad():
        for ids, mask in zip((ids1, ids2, step), masks):
            kwargs = {}
            if llama:  # what generate() passes: positions that count real tokens only
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
            logits.append(model(ids, attention_mask=mask, past_key_values=cache, use_cache=True, **kwargs).logits)
        worst = 0.0
        for row, (first, second) in enumerate(zip(first_turns, second_turns)):
            alone = model(torch.cat([first, second, step[row]])[None], use_cache=False).logits[0]
            ours = torch.cat([logits[1][row, -len(second):], logits[2][row]])
            worst = max(worst, rel_err(ours, alone[len(first):]))
    return worst


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batched_chat_continuation_equals_each_row_alone_as_in_llama(backend):
    first_turns = [torch.randint(3, 48, (n,)) for n in (6, 3)]
    second_turns = [torch.randint(3, 48, (n,)) for n in (2, 5)]
    step = torch.randint(3, 48, (2, 1))
    llama_error = _chat_continuation(_tiny_llama(), first_turns, second_turns, step, llama=True)
    torch.manual_seed(0)
    model = TransNormerLLMForCausalLM(tiny_config(attention_backend=backend)).eval()
    error = _chat_continuation(model, first_turns, second_turns, step)
    assert llama_error < 1e-5, llama_error  # the reference behaviour this test asks of TNL
    assert error < 1e-5, f"TNL rows differ from each row alone by {error:.2e} (Llama: {llama_error:.2e})"


@pytest.mark.parametrize("mask_row", [[1, 0, 0, 1, 1, 1], [0, 1, 1, 0, 1, 0]], ids=["gap", "gaps-and-ends"])
def test_masked_tokens_inside_a_row_take_no_part_without_a_cache(tiny_model, mask_row):
    ids = torch.randint(3, 48, (2, 6))
    mask = torch.tensor([[1] * 6, mask_row])
    with torch.no_grad():
        logits = tiny_model(ids, attention_mask=mask, use_cache=False).logits
        real = mask[1].bool()
        alone = tiny_model(ids[1:, real], use_cache=False).logits
        full = tiny_model(ids[:1], use_cache=False).logits
    assert rel_err(logits[1, real], alone[0]) < 1e-6
    assert rel_err(logits[0], full[0]) < 1e-6
    assert torch.isfinite(logits).all()


def test_gathered_rows_have_the_gradients_of_each_row_alone(tiny_model):
    ids = torch.randint(3, 48, (2, 6))
    mask = torch.tensor([[1] * 6, [1, 1, 0, 0, 1, 1]])
    real = mask.bool()
    weights = torch.randn(int(real.sum()), 48)
    tiny_model.train()
    (tiny_model(ids, attention_mask=mask, use_cache=False).logits[real] * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    alone = torch.cat([tiny_model(ids[r:r + 1, real[r]], use_cache=False).logits[0] for r in range(2)])
    (alone * weights).sum().backward()
    for name, param in tiny_model.named_parameters():
        assert rel_err(grads[name], param.grad) < 1e-5, name


def _packed_rows(docs_per_row):
    ids = torch.stack([torch.cat(docs) for docs in docs_per_row])
    positions = torch.cat([torch.arange(len(doc)) for doc in docs_per_row[0]])
    return ids, positions


def _worst_document_error(logits, docs_per_row, run_alone):
    worst = 0.0
    for row, docs in enumerate(docs_per_row):
        start = 0
        for doc in docs:
            worst = max(worst, rel_err(logits[row, start:start + len(doc)], run_alone(doc[None])[0]))
            start += len(doc)
    return worst


def test_one_row_of_position_ids_holds_for_every_row_as_in_llama(tiny_model):
    lengths = (5, 9, 2)
    docs_per_row = [[torch.randint(3, 48, (n,)) for n in lengths] for _ in range(2)]
    ids, positions = _packed_rows(docs_per_row)
    llama = _tiny_llama()
    with torch.no_grad():
        llama_error = _worst_document_error(llama(ids, position_ids=positions[None], use_cache=False).logits, docs_per_row,
                                            lambda doc: llama(doc).logits)
        logits = tiny_model(ids, position_ids=positions[None], use_cache=False).logits
        error = _worst_document_error(logits, docs_per_row, lambda doc: tiny_model(doc, use_cache=False).logits)
    assert llama_error < 1e-5, llama_error
    assert error < 1e-5, f"documents differ from each alone by {error:.2e} (Llama: {llama_error:.2e})"


def test_position_ids_of_another_shape_are_refused(tiny_model):
    with pytest.raises(ValueError, match=r"position_ids must have shape \(batch, length\) = \(2, 4\)"):
        tiny_model(torch.randint(3, 48, (2, 4)), position_ids=torch.arange(5)[None], use_cache=False)
