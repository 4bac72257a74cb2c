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
