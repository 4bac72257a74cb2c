"""Multi-process training on CPU with the gloo backend: DDP, FSDP2 and the tensor-parallel plan each give the
single-process result on the same global batch, and `transnormer-hf train` runs under torchrun.

Each test starts `torchrun --nproc-per-node 2` on this file; its `__main__` part is the worker.
"""

from __future__ import annotations

import argparse
import atexit
import os
import subprocess
import sys
from pathlib import Path

import torch

WORLD_SIZE = 2
LEARNING_RATE = 0.5
DOCUMENT_LENGTHS = (7, 12, 4, 9)  # different valid-label counts per rank: a mean-of-means would be wrong


def _tiny_model():
    from transnormer_hf import TransNormerLLMConfig, TransNormerLLMForCausalLM

    torch.manual_seed(0)
    config = TransNormerLLMConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, lrpe_layers=[1, 0], initializer_range=0.2)
    return TransNormerLLMForCausalLM(config)


def _global_batch() -> dict[str, torch.Tensor]:
    from transnormer_hf.data import PaddedCollator

    generator = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(3, 40, (n,), generator=generator).tolist()} for n in DOCUMENT_LENGTHS]
    return PaddedCollator(pad_token_id=0)(rows)


def _num_items(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != -100).sum())


def sgd_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], num_items: int, loss_scale: float) -> float:
    """One SGD step on `batch` with the loss normalised by the global label count; returns the local loss sum."""
    loss = model(**batch, num_items_in_batch=num_items).loss
    (loss * loss_scale).backward()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter -= LEARNING_RATE * parameter.grad
    return loss.item()


def single_process_step() -> tuple[float, dict[str, torch.Tensor]]:
    model = _tiny_model().train()
    batch = _global_batch()
    loss = sgd_step(model, batch, _num_items(batch["labels"]), 1.0)
    return loss, {name: value.detach().clone() for name, value in model.state_dict().items()}


def _process_tree(root: int) -> list[int]:
    """`root` and its descendants, from /proc (torchrun starts each worker in a session of its own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree = [root]
    for pid in tree:
        tree += [child for child, parent in parents.items() if parent == pid]
    return tree


def _dump_stacks_and_kill(process: subprocess.Popen) -> str:
    """Abort every process of a hung torchrun (agent and workers): with PYTHONFAULTHANDLER set, each prints its
    threads' Python stacks on SIGABRT. Returns what they printed."""
    import signal
    import time

    tree = _process_tree(process.pid)
    for send, then_wait in ((signal.SIGABRT, 3), (signal.SIGKILL, 0)):
        for pid in tree:
            try:
                os.kill(pid, send)
            except ProcessLookupError:
                pass
        time.sleep(then_wait)
    return process.communicate()[1] or ""


def _run_torchrun(tmp_path: Path, *worker_args: str, attempt_seconds: int = 150,
                  nproc: int = WORLD_SIZE) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc-per-node <nproc> --standalone <worker_args>` and assert it succeeds.

    Once in many CI runs torchrun hung after its workers had printed their last line (training done, model saved);
    the interpreter teardown that `finish_distributed_rank` now skips is the likely place, but that is not proven.
    So a hung attempt dumps every process's stacks into a warning and runs once more; a failure, or a second hang,
    fails the test. PYTHONFAULTHANDLER also puts the stacks of a crashed rank into the failure message.
    """
    import warnings

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONFAULTHANDLER": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--standalone", *worker_args]
    for attempt in (1, 2):
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=attempt_seconds)
        except subprocess.TimeoutExpired:
            stacks = _dump_stacks_and_kill(process)
            assert attempt == 1, f"torchrun hung twice (> {attempt_seconds} s); stacks:\n{stacks[-8000:]}"
            warnings.warn(f"torchrun hung (> {attempt_seconds} s) and was run again; stacks:\n{stacks[-8000:]}")
            continue
        assert process.returncode == 0, f"torchrun failed:\n{stdout[-3000:]}\n{stderr[-5000:]}"
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_ddp_and_fsdp2_match_single_process(tmp_path):
    out = tmp_path / "steps.pt"
    _run_torchrun(tmp_path, __file__, "--mode", "ddp", "fsdp2", "--out", str(out))
    # finish_distributed_rank skips the interpreter's teardown but must still run Python's exit handlers
    assert sorted(path.name for path in tmp_path.glob("exit_handler_ran_*")) == ["exit_handler_ran_0",
                                                                                 "exit_handler_ran_1"]
    results = torch.load(out)
    loss, state = single_process_step()
    initial = _tiny_model().state_dict()
    assert any(not torch.equal(initial[name], value) for name, value in state.items()), "the step changed nothing"
    for mode in ("ddp", "fsdp2"):
        assert abs(results[mode]["loss"] - loss) <= 1e-5 * abs(loss), (mode, results[mode]["loss"], loss)
        for name, value in state.items():
            torch.testing.assert_close(results[mode]["state"][name], value, rtol=1e-5, atol=1e-6, msg=f"{mode} {name}")


def test_tensor_parallel_plan_matches_single_process(tmp_path):
    """`from_pretrained(..., tp_plan="auto")` shards the channel mixer over 2 ranks: same logits and loss."""
    model = _tiny_model().eval()
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "tp.pt"
    _run_torchrun(tmp_path, __file__, "--mode", "tp", "--out", str(out), "--model-dir", str(tmp_path / "model"))
    result = torch.load(out)
    batch = _global_batch()
    with torch.no_grad():
        reference = model(**batch)
    assert result["sharded"], "no parameter was sharded"
    torch.testing.assert_close(result["logits"], reference.logits, rtol=1e-5, atol=1e-5)
    assert abs(result["loss"] - reference.loss.item()) <= 1e-5 * reference.loss.item()


def test_train_cli_under_torchrun_matches_one_process(tmp_path):
    """2 ranks x batch 1 under torchrun train the same weights as 1 process x batch 2 (gloo DDP via Trainer)."""
    from safetensors.torch import load_file

    from transnormer_hf.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"text": "{"ab cd " * (3 + i % 5)}doc {i}"}}\n' for i in range(8)))
    common = ["train", "--model", "tiny", "--data", str(data), "--max-length", "64", "--max-steps", "2",
              "--lr", "1e-2", "--no-progress", "--save-steps", "100", "--logging-steps", "1"]
    assert main([*common, "--output-dir", str(tmp_path / "one"), "--batch-size", "2"]) == 0
    run = _run_torchrun(tmp_path, "-m", "transnormer_hf", *common, "--output-dir", str(tmp_path / "two"),
                        "--batch-size", "1")
    # one rank reports the save, naming exactly the files the folder holds
    final = tmp_path / "two" / "final"
    assert run.stdout.count("saved model to") == 1, run.stdout
    assert f"saved model to {final} ({', '.join(sorted(path.name for path in final.iterdir()))})" in run.stdout
    one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    two = load_file(final / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)


# ---- the worker, run by torchrun ----------------------------------------------------------------------------------

def _data_parallel_step(mode: str, rank: int, world: int, batch: dict[str, torch.Tensor]) -> dict:
    import torch.distributed as dist

    local = {key: value[rank * 2 : rank * 2 + 2] for key, value in batch.items()}  # rows split across ranks
    model = _tiny_model().train()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    # Both average gradients over ranks; the loss is a sum over the global label count, so scale it back.
    total = torch.tensor(sgd_step(wrapped, local, _num_items(batch["labels"]), float(world)))
    dist.all_reduce(total)
    state = {name: value.full_tensor() if hasattr(value, "full_tensor") else value
             for name, value in model.state_dict().items()}
    return {"loss": total.item(), "state": {name: value.detach().clone() for name, value in state.items()}}


def _tensor_parallel_forward(model_dir: str, batch: dict[str, torch.Tensor]) -> dict:
    from torch.distributed.tensor import DTensor

    from transnormer_hf import TransNormerLLMForCausalLM

    model = TransNormerLLMForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32).eval()
    with torch.no_grad():
        output = model(**batch)
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    return {"logits": output.logits, "loss": output.loss.item(), "sharded": sharded}


def _worker(modes: list[str], out: str, model_dir: str | None) -> None:
    import torch.distributed as dist

    from transnormer_hf.training import finish_distributed_rank

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    atexit.register((Path(out).parent / f"exit_handler_ran_{rank}").touch)
    batch = _global_batch()
    if modes == ["tp"]:
        result = _tensor_parallel_forward(model_dir, batch)
    else:
        result = {mode: _data_parallel_step(mode, rank, world, batch) for mode in modes}
    if rank == 0:
        torch.save(result, out)
    finish_distributed_rank()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", nargs="+", choices=("ddp", "fsdp2", "tp"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-dir", default=None)
    arguments = parser.parse_args()
    _worker(arguments.mode, arguments.out, arguments.model_dir)
