"""Context parallelism (one sequence split across ranks, LASP-2) equals one process on the whole sequence.

One `torchrun` launch per world size (2 and 4 ranks, gloo on CPU) runs every case of this file's worker
(`__main__`): each rank builds the same global inputs from a seed, runs its slice under context parallelism and
the whole sequence on its own, and reports the largest relative error (max over ranks) of every output, state
and gradient. A deliberately broken carry (wrong decay exponent, states in the wrong rank order) must miss.
`train --context-parallel 2` under torchrun trains the weights of one process on the same global batch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import _run_torchrun  # noqa: E402  (the torchrun helper with hang handling)

TOLERANCE = 1e-5
BROKEN = ("broken_exponent", "broken_rank_order")


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def errors(request, tmp_path_factory) -> dict[str, float]:
    tmp_path = tmp_path_factory.mktemp(f"cp{request.param}")
    out = tmp_path / "errors.pt"
    _run_torchrun(tmp_path, __file__, "--out", str(out), nproc=request.param, attempt_seconds=400)
    return torch.load(out)


def test_context_parallel_matches_one_process(errors):
    exact = {name: error for name, error in errors.items() if not name.startswith(BROKEN)}
    assert len(exact) >= 8, sorted(errors)
    for name, error in exact.items():
        print(f"{name}: {error:.2e}")
    failed = {name: error for name, error in exact.items() if not error <= TOLERANCE}
    assert not failed, f"relative errors above {TOLERANCE}: {failed}"


def test_broken_carry_is_caught(errors):
    """The same comparison catches a carry with lambda^t instead of lambda^(t+1), and states gathered in reverse."""
    for broken in BROKEN:
        caught = {name: error for name, error in errors.items() if name.startswith(broken)}
        assert caught, sorted(errors)
        assert all(error > 100 * TOLERANCE for error in caught.values()), caught


def test_train_cli_context_parallel_matches_one_process(tmp_path):
    """`train --context-parallel 2` on 2 ranks x 1 packed row trains the weights of 1 process x 2 rows."""
    from safetensors.torch import load_file

    from transnormer_hf.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"text": "{"ab cd " * (3 + i % 5)}doc {i}"}}\n' for i in range(8)))
    common = ["train", "--model", "tiny", "--data", str(data), "--max-length", "64", "--max-steps", "3",
              "--lr", "1e-2", "--no-progress", "--save-steps", "100", "--logging-steps", "1",
              "--gradient-checkpointing", "--loss-chunk-size", "16"]
    assert main([*common, "--output-dir", str(tmp_path / "one"), "--batch-size", "2"]) == 0
    _run_torchrun(tmp_path, "-m", "transnormer_hf", *common, "--output-dir", str(tmp_path / "cp"),
                  "--batch-size", "1", "--context-parallel", "2")
    one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    cp = load_file(tmp_path / "cp" / "final" / "model.safetensors")
    assert one.keys() == cp.keys()
    for name in one:
        torch.testing.assert_close(cp[name], one[name], rtol=1e-4, atol=1e-5, msg=name)


def test_train_cli_context_parallel_needs_packing(tmp_path, capsys):
    from transnormer_hf.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "ab cd ab cd"}\n')
    assert main(["train", "--model", "tiny", "--data", str(data), "--output-dir", str(tmp_path / "out"),
                 "--context-parallel", "2", "--no-packing"]) == 2
    assert "--context-parallel must be at least 1 and needs --packing" in capsys.readouterr().err


def test_train_cli_refuses_accelerates_own_context_parallelism(tmp_path, capsys, monkeypatch):
    """An accelerate config with parallelism_config cp_size 2 (what `accelerate launch` exports) is a clear error
    naming --context-parallel, before the data and the model are loaded, not Trainer's error at the first step."""
    from transnormer_hf.cli import main

    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "2")
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "ab cd ab cd"}\n')
    assert main(["train", "--model", "tiny", "--data", str(data), "--output-dir", str(tmp_path / "out")]) == 2
    assert "parallelism_config cp_size 2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "1")  # what accelerate exports for a config without CP
    assert main(["train", "--model", "tiny", "--data", str(data), "--output-dir", str(tmp_path / "out"),
                 "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err  # the next check: cp_size 1 passed


# ---- the worker, run by torchrun ----------------------------------------------------------------------------------

def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _op_case(name: str, *, batch: int, length: int, key_dim: int, value_dim: int, bounds: list[int] | None = None,
             initial: bool = False, backend: str = "torch") -> dict[str, float]:
    """Output, final state and all input gradients of the op under context parallelism vs one process."""
    import torch.distributed as dist

    from transnormer_hf.kernels import layout_from_cu_seqlens, lightning_attn, slice_lengths

    generator = torch.Generator().manual_seed(length * 31 + key_dim)
    heads = 2
    q, k = (torch.randn(batch, length, heads, key_dim, generator=generator) for _ in range(2))
    v = torch.randn(batch, length, heads, value_dim, generator=generator)
    rates = torch.tensor([0.02, 0.6])
    state0 = torch.randn(batch, heads, key_dim, value_dim, generator=generator) if initial else None
    weight = torch.randn(batch, length, heads, value_dim, generator=generator)
    final_weight = torch.randn(batch, heads, key_dim, value_dim, generator=generator)
    cu_seqlens = torch.tensor(bounds) if bounds is not None else None
    with_final = bounds is None

    def run(q, k, v, state0, weight, count_final: bool = True, **kwargs):
        q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
        state0 = state0.clone().requires_grad_() if state0 is not None else None
        o, final = lightning_attn(q, k, v, rates, initial_state=state0, output_final_state=with_final,
                                  backend=backend, **kwargs)
        loss = (o * weight).sum() + ((final * final_weight).sum() if with_final and count_final else 0.0)
        loss.backward()
        grads = [x.grad for x in (q, k, v)] + ([state0.grad] if state0 is not None else [])
        return o, final, grads

    o_ref, final_ref, grads_ref = run(q, k, v, state0, weight, cu_seqlens=cu_seqlens)
    group = dist.group.WORLD
    rank = dist.get_rank()
    layout, local_cu_seqlens = layout_from_cu_seqlens(group, slice_lengths(length, dist.get_world_size()), cu_seqlens)
    piece = slice(layout.offset, layout.offset + layout.lengths[rank])
    local_state0 = state0 if rank == 0 else None  # read on the first rank only
    # every rank holds the whole sequence's final state: a loss on it counts once over the group
    o, final, grads = run(q[:, piece], k[:, piece], v[:, piece], local_state0, weight[:, piece], rank == 0,
                          cu_seqlens=local_cu_seqlens, context_parallel=layout)
    result = {f"{name}/o": _rel(o, o_ref[:, piece])}
    if with_final:
        result[f"{name}/final_state"] = _rel(final, final_ref)
    for label, grad, grad_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        result[f"{name}/{label}"] = _rel(grad, grad_ref[:, piece])
    if initial:  # its gradient lands on the first rank alone
        result[f"{name}/d_initial_state"] = _rel(grads[3], grads_ref[3]) if rank == 0 else 0.0
    return result


def _op_cases(world: int) -> dict[str, float]:
    import transnormer_hf.kernels.context_parallel as cp

    total = 45 if world == 2 else 90
    # documents that cross rank boundaries (slices of 23, 22 tokens; 4 ranks: 23, 23, 22, 22), a single-token
    # one, and with 4 ranks one that starts exactly on a boundary (23) and one that spans a whole rank (45-89)
    packed = [0, 5, 20, 24, 25, 45] if world == 2 else [0, 5, 23, 24, 45, 89, 90]
    errors = {}
    for name, kwargs in {
        "plain_N16": dict(batch=2, length=16, key_dim=8, value_dim=8),
        "plain_N13": dict(batch=2, length=13, key_dim=8, value_dim=8),
        "plain_N130_blocks": dict(batch=1, length=130, key_dim=8, value_dim=8),  # > 64-token block on each rank
        "plain_N256_blocks": dict(batch=1, length=256, key_dim=8, value_dim=8),
        "initial_state": dict(batch=2, length=19, key_dim=8, value_dim=8, initial=True),
        "dk_2dv": dict(batch=2, length=21, key_dim=16, value_dim=8, initial=True),
        "packed": dict(batch=1, length=total, key_dim=8, value_dim=8, bounds=packed),
    }.items():
        errors.update(_op_case(name, **kwargs))
    if world == 2:  # the Triton kernel under TRITON_INTERPRET=1 on CPU tensors
        errors.update(_op_case("triton", batch=1, length=40, key_dim=16, value_dim=16, initial=True, backend="triton"))
        errors.update(_op_case("triton_packed", batch=1, length=40, key_dim=16, value_dim=16,
                               bounds=[0, 7, 26, 33, 40], backend="triton"))

    def wrong_exponent(rates, length):  # lambda^t instead of lambda^(t+1)
        steps = torch.arange(length, dtype=rates.dtype)
        return torch.exp(-rates.view(1, -1) * steps.view(-1, 1)).unsqueeze(-1)

    gather = cp._gather_states
    for broken, patch in (("broken_exponent", ("_query_decay", wrong_exponent)),
                          ("broken_rank_order", ("_gather_states", lambda *a: gather(*a)[::-1]))):
        original = getattr(cp, patch[0])
        setattr(cp, patch[0], patch[1])
        try:
            for name, kwargs in {"plain": dict(batch=2, length=16, key_dim=8, value_dim=8),
                                 "packed": dict(batch=1, length=total, key_dim=8, value_dim=8, bounds=packed)}.items():
                case = _op_case(f"{broken}_{name}", **kwargs)
                errors[f"{broken}_{name}"] = max(value for key, value in case.items() if key.endswith("/o"))
        finally:
            setattr(cp, patch[0], original)
    return errors


def _tiny_model(**overrides):
    from transnormer_hf import TransNormerLLMConfig, TransNormerLLMForCausalLM

    torch.manual_seed(0)
    fields = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                  lrpe_layers=[1, 1], initializer_range=0.2)  # LRPE everywhere: d_k = 2 d_v in every layer
    return TransNormerLLMForCausalLM(TransNormerLLMConfig(**{**fields, **overrides})).train()


def _model_batch(rows: int, length: int, documents: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Random tokens with a few ignored labels; `documents`: lengths of documents packed into one row."""
    generator = torch.Generator().manual_seed(rows * 100 + length)
    input_ids = torch.randint(3, 40, (rows, length), generator=generator)
    labels = input_ids.clone()
    labels[:, 3] = -100
    batch = {"input_ids": input_ids, "labels": labels}
    if documents is not None:
        assert rows == 1 and sum(documents) == length
        batch["position_ids"] = torch.cat([torch.arange(n) for n in documents]).view(1, -1)
        starts = torch.tensor(documents).cumsum(0)[:-1]
        labels[0, starts] = -100  # DataCollatorWithFlattening: no token predicts the next document's first
    return batch


def _model_case(name: str, batch: dict[str, torch.Tensor], checkpointing: bool = False,
                **config) -> dict[str, float]:
    """Loss and every parameter gradient of the model on its slice (summed over ranks) vs the whole batch."""
    import torch.distributed as dist

    from transnormer_hf.context_parallel import enable_context_parallel, shard_for_context_parallel

    models = [_tiny_model(**config) for _ in range(2)]
    if checkpointing:
        for model in models:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = models[0](**batch).loss
    reference.backward()
    group = dist.group.WORLD
    enable_context_parallel(models[1], group)
    loss = models[1](**shard_for_context_parallel(batch, group)).loss
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    errors = {f"{name}/loss": abs(total.item() - reference.item()) / abs(reference.item())}
    for (param_name, ref), param in zip(models[0].named_parameters(), models[1].parameters()):
        grad = param.grad.clone()
        dist.all_reduce(grad)
        errors[f"{name}/grad/{param_name}"] = _rel(grad, ref.grad)
    return errors


def _fsdp2_case(batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """FSDP2 over all 4 ranks x context parallelism 2: a (dp 2, cp 2) mesh, one row per data-parallel group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from transnormer_hf.context_parallel import enable_context_parallel, shard_for_context_parallel

    reference_model = _tiny_model()
    reference = reference_model(**batch).loss
    reference.backward()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    row = mesh.get_local_rank("dp")
    model = _tiny_model()
    enable_context_parallel(model, mesh.get_group("cp"))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    local = shard_for_context_parallel({key: value[row : row + 1] for key, value in batch.items()},
                                       mesh.get_group("cp"))
    num_items = int((batch["labels"][:, 1:] != -100).sum())  # the global batch's label count
    loss = model(**local, num_items_in_batch=num_items).loss
    (loss * dist.get_world_size()).backward()  # FSDP2 averages gradients over its 4 ranks; the losses add up
    total = loss.detach().clone()
    dist.all_reduce(total)
    errors = {"fsdp2_cp/loss": abs(total.item() - reference.item()) / abs(reference.item())}
    for (name, ref), param in zip(reference_model.named_parameters(), model.parameters()):
        errors[f"fsdp2_cp/grad/{name}"] = _rel(param.grad.full_tensor(), ref.grad)
    return errors


def _model_cases(world: int) -> dict[str, float]:
    length = 29 if world == 2 else 58  # not a multiple of the rank count
    documents = [5, 12, 1, 11] if world == 2 else [5, 12, 1, 11, 3, 20, 6]  # documents across rank boundaries
    errors = {}
    errors.update(_model_case("model_plain", _model_batch(2, length)))
    errors.update(_model_case("model_packed", _model_batch(1, length, documents)))
    errors.update(_model_case("model_checkpointing", _model_batch(1, length, documents), checkpointing=True))
    errors.update(_model_case("model_chunked_loss", _model_batch(2, length), loss_chunk_size=8))
    if world == 2:
        errors.update(_model_case("model_blocks", _model_batch(1, 150)))  # slices longer than a 64-token block
    else:
        errors.update(_fsdp2_case(_model_batch(2, length)))
    return errors


def _worker(out: str) -> None:
    import torch.distributed as dist

    from transnormer_hf.training import finish_distributed_rank

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    errors = {**_op_cases(world), **_model_cases(world)}
    names = sorted(errors)  # the largest error over ranks
    table = torch.tensor([errors.get(name, 0.0) for name in names], dtype=torch.float64)
    dist.all_reduce(table, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        torch.save(dict(zip(names, table.tolist())), out)
    finish_distributed_rank()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    _worker(parser.parse_args().out)
