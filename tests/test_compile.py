"""torch.compile of the model: fullgraph with position_ids (packed or not), and one graph for every length on CPU."""

import pytest
import torch

from checks import rel_err
from conftest import tiny_config
from transnormer_hf import TransNormerLLMForCausalLM


def _grads(model):
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def _packed_inputs(case):
    ids = torch.randint(3, 48, (2, 12))
    if case == "arange":
        return dict(input_ids=ids, position_ids=torch.arange(12)[None].expand(2, -1))
    restarts = torch.cat([torch.arange(5), torch.arange(7)])
    if case == "packed":  # two documents in each row
        return dict(input_ids=ids, position_ids=restarts[None].expand(2, -1))
    # DataCollatorWithFlattening(return_flash_attn_kwargs=True): one row and its boundaries
    return dict(input_ids=ids.view(1, 24), position_ids=restarts.repeat(2)[None],
                cu_seq_lens_q=torch.tensor([0, 5, 12, 17, 24]), cu_seq_lens_k=torch.tensor([0, 5, 12, 17, 24]))


@pytest.mark.parametrize("case,backend", [("arange", "torch"), ("packed", "torch"), ("cu_seq_lens", "torch"),
                                          ("packed", "triton")])
def test_fullgraph_compile_with_position_ids_equals_eager(case, backend):
    torch._dynamo.reset()
    model = TransNormerLLMForCausalLM(tiny_config(attention_backend=backend)).train()
    inputs = _packed_inputs(case)
    inputs["labels"] = inputs["input_ids"]
    # aot_eager traces forward and backward through AOTAutograd like inductor, without the C++ build time.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(**inputs).loss
    loss.backward()
    compiled_grads = _grads(model)
    model.zero_grad()
    eager = model(**inputs).loss
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=0)
    for name, grad in _grads(model).items():
        assert rel_err(compiled_grads[name], grad) < 1e-5, name


def _graphs_for_lengths(model, lengths):
    """How many graphs torch.compile builds for training steps on inputs of these lengths."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)
    for length in lengths:
        ids = torch.randint(3, 48, (2, length))
        compiled(input_ids=ids, labels=ids).loss.backward()
    return len(graphs)


def test_cpu_path_compiles_once_for_all_lengths_as_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    lengths = [10, 37, 64, 70, 130, 200]  # one block, whole blocks and ragged ones
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=48)).train()
    llama_graphs = _graphs_for_lengths(llama, lengths)
    graphs = _graphs_for_lengths(TransNormerLLMForCausalLM(tiny_config()).train(), lengths)
    assert llama_graphs == 2  # one for the first length, one with a dynamic length for all others
    assert graphs <= llama_graphs, f"{graphs} graphs for {len(lengths)} lengths (Llama: {llama_graphs})"


def test_compiled_forward_takes_padding_and_names_the_masks_it_cannot():
    torch._dynamo.reset()
    model = TransNormerLLMForCausalLM(tiny_config()).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = torch.randint(3, 48, (2, 6))
    right_padded = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        out = compiled(input_ids=ids, attention_mask=right_padded, use_cache=False).logits
        expected = model(input_ids=ids, attention_mask=right_padded, use_cache=False).logits
        assert rel_err(out, expected) < 1e-6
        with pytest.raises(RuntimeError, match="cannot run in a compiled forward: without a cache, the real tokens"):
            compiled(input_ids=ids, attention_mask=torch.tensor([[1] * 6, [1, 0, 0, 1, 1, 1]]), use_cache=False)
