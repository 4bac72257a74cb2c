"""Context parallelism (one sequence across GPUs, LASP-2): throughput, longest context, communication, memory.

    torchrun --nproc-per-node 8 benchmarks/context_parallel.py --out benchmarks/results/cp_1b_h200x8.json
    python benchmarks/context_parallel.py --out benchmarks/results/cp_1b_h200x1.json      # world size 1
    torchrun --nproc-per-node 2 benchmarks/context_parallel.py --shape tiny --device cpu --contexts 256 \\
        --longest-start 0 --out /tmp/cp_smoke.json                                        # a CPU (gloo) smoke run

One process per GPU, NCCL, the whole world as one context-parallel group; batch 1, TNL in bf16, every layer
checkpointed, loss in chunks, fused AdamW. Parts (each row goes to the JSON as soon as it is measured, on rank 0):
- train: at each global `--contexts` length, tokens/s per GPU (median of the timed steps) and peak memory of
  every rank. At world size 1 the same step also runs with context parallelism switched on (a group of one,
  which `enable_context_parallel` turns into the plain path) against the plain model: `cp_over_plain` must
  stay within 3%.
- comm: the per-layer all-gather of the (1, H, d_k, d_v) fp32 states and its backward, in ms (CUDA events).
- longest: the longest global context whose training step fits, doubled from `--longest-start` then x1.25.
Out-of-memory is a result (on any rank, agreed over the group), not an error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from transnormer_hf import TransNormerLLMConfig, TransNormerLLMForCausalLM
from transnormer_hf.context_parallel import enable_context_parallel, shard_for_context_parallel
from transnormer_hf.kernels.context_parallel import _gather_states, layout_from_cu_seqlens


def _config(shape: str) -> TransNormerLLMConfig:
    if shape == "tiny":
        return TransNormerLLMConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=128, loss_chunk_size=1024)
    return TransNormerLLMConfig.from_preset(shape, loss_chunk_size=8192)


def _sync(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _step_seconds(model, optimizer, context: int, steps: int, device: str, group) -> float:
    """Median seconds of one training step on a random sequence of `context` global tokens (2 warm-up steps)."""
    ids = torch.randint(3, model.config.vocab_size, (1, context), device=device)
    batch = {"input_ids": ids, "labels": ids}
    if group is not None:
        batch = shard_for_context_parallel(batch, group)
    times = []
    for _ in range(steps + 2):
        start = _sync(device)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(_sync(device) - start)
    return statistics.median(times[2:])


def _fits_everywhere(ok: bool, device: str) -> bool:
    flag = torch.tensor([int(ok)], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _peak_per_rank(device: str) -> list[float] | None:
    if device != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=device)
    peaks = [torch.empty_like(peak) for _ in range(dist.get_world_size())] if dist.is_initialized() else [peak]
    if dist.is_initialized():
        dist.all_gather(peaks, peak)
    return [round(p.item(), 2) for p in peaks]


def _try_step(model, optimizer, context, steps, device, group) -> tuple[float | None, list[float] | None]:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        seconds, ok = _step_seconds(model, optimizer, context, steps, device, group), True
    except torch.OutOfMemoryError:
        seconds, ok = None, False
        optimizer.zero_grad(set_to_none=True)
    if not _fits_everywhere(ok, device):
        return None, None
    return seconds, _peak_per_rank(device)


def _comm_ms(config: TransNormerLLMConfig, device: str, iterations: int = 50) -> dict:
    """The per-layer state all-gather (forward) and its reduce-scatter (backward), median ms over iterations."""
    group, world = dist.group.WORLD, dist.get_world_size()
    layout, _ = layout_from_cu_seqlens(group, (1,) * world)
    key_dim = config.head_dim * (2 if any(config.lrpe_layers) else 1)  # LRPE doubles d_k
    state = torch.randn(1, config.num_attention_heads, key_dim, config.head_dim, device=device, requires_grad=True)
    forward, backward = [], []
    for _ in range(iterations):
        start = _sync(device)
        gathered = torch.stack(_gather_states(state, layout))
        middle = _sync(device)
        gathered.sum().backward()
        forward.append(middle - start)
        backward.append(_sync(device) - middle)
    return dict(state_shape=list(state.shape), forward_ms=round(1e3 * statistics.median(forward), 4),
                backward_ms=round(1e3 * statistics.median(backward), 4))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1B", help="a preset (385M, 1B, 3B, 7B, ...) or tiny")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--contexts", nargs="+", type=int, default=[32768, 131072, 393216],
                        help="global tokens per training step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--longest-start", type=int, default=131072, help="0: skip the longest-context search")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    group = dist.group.WORLD if world > 1 else None
    device = args.device
    config = _config(args.shape)
    with torch.device(device):
        model = TransNormerLLMForCausalLM(config).to(torch.bfloat16).train()
    # transformers 5.23 renamed gradient_checkpointing_enable to activation_checkpointing_enable
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    meta = dict(command=" ".join(sys.argv), world_size=world, shape=args.shape, torch=torch.__version__,
                gpu=torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
                date=time.strftime("%Y-%m-%d"))
    rows = []

    def record(row: dict) -> None:
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))

    if world == 1:  # the context-parallel path at world size 1 costs nothing: plain vs a group of one
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method="tcp://127.0.0.1:29533",
                                    rank=0, world_size=1)
    for context in args.contexts:
        enable_context_parallel(model, group)
        seconds, peaks = _try_step(model, optimizer, context, args.steps, device, group)
        row = dict(part="train", context=context, world_size=world, tokens_per_rank=context // world)
        if seconds is None:
            record({**row, "result": "out of memory"})
            continue
        row.update(result="ok", step_s=round(seconds, 4), tokens_per_s_per_gpu=round(context / seconds / world),
                   peak_gib_per_rank=peaks)
        if world == 1:
            enable_context_parallel(model, dist.group.WORLD)
            cp_seconds, _ = _try_step(model, optimizer, context, args.steps, device, dist.group.WORLD)
            enable_context_parallel(model, None)
            if cp_seconds is not None:
                row.update(cp_step_s=round(cp_seconds, 4), cp_over_plain=round(cp_seconds / seconds, 4))
        record(row)
    enable_context_parallel(model, group)
    if world > 1:
        record(dict(part="comm", **_comm_ms(config, device)))
    context, longest, factor = args.longest_start, None, 2.0
    while context:
        seconds, peaks = _try_step(model, optimizer, context, 1, device, group)
        if seconds is None:
            if factor == 2.0 and longest is not None:  # refine between the last fit and this miss
                factor, context = 1.25, int(longest * 1.25)
                continue
            break
        longest = context
        record(dict(part="longest", context=context, world_size=world, step_s=round(seconds, 4),
                    peak_gib_per_rank=peaks))
        context = int(context * factor)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
