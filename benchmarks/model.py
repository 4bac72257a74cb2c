"""Whole-model performance, TNL against a same-size Llama (SDPA), both in one run: training, decoding, prefill.

    python benchmarks/model.py --shape 1B --out benchmarks/results/model_1b_h100.json
    python benchmarks/model.py --plot benchmarks/results/model_1b_h100.json [more.json]  # plots, any machine
    python benchmarks/model.py --shape tiny --device cpu --out /tmp/smoke.json    # a CPU smoke run

Parts (`--parts`, default all; every row is written to the JSON as soon as it is measured):
- train: forward, backward and fused AdamW step in bf16, a fixed number of tokens per optimizer step
  (`--tokens-per-step`, split into micro-batches of `--micro-tokens` tokens with gradient accumulation, or one
  row when the context is longer). Both models get the same policy: the least activation checkpointing that fits
  (no layers, then half, then all: `--checkpoint-fractions`). TNL computes its loss in chunks
  (`loss_chunk_size`); Llama uses transformers' loss. tokens/s is the median of the timed steps.
- profile: a torch.profiler table of one TNL training step at `--profile-context` (written beside the JSON).
- decode: one greedy step at each context and batch, the cache built without a prefill (TNL's states from one
  step, Llama's keys and values random); ms per token, tokens/s of the batch, cache bytes. TNL also at the large
  `--big-batches` at `--big-batch-context`.
- static: TNL's compiled decode step (torch.compile, CUDA graphs) on a static cache at each decode context and
  batch; then `generate(..., cache_implementation="static")` against the default cache, per-token time from two
  generation lengths (so prefill and compile drop out).
- prefill: a forward of `--prefill-tokens` tokens filling the cache, logits for the last position only.
- longest: batch 1, all layers checkpointed, context doubled (then x1.5) until out of memory.
Out-of-memory is recorded as a result, not raised.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from transnormer_hf import TransNormerLLMConfig, TransNormerLLMForCausalLM
from transnormer_hf.baselines import decode_step_seconds, same_size_llama

PARTS = ("train", "profile", "decode", "static", "prefill", "longest")


class Recorder:
    """Rows of results, rewritten to the JSON after every row so a killed run keeps what it measured."""

    def __init__(self, out: Path, meta: dict) -> None:
        self.out, self.meta, self.rows = out, meta, []
        out.parent.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.out.write_text(json.dumps(dict(meta=self.meta, rows=self.rows), indent=1))
        return row


def tnl_config(shape: str, vocab_size: int, loss_chunk_size: int) -> TransNormerLLMConfig:
    """A released TNL shape, or "tiny" for smoke runs on a CPU."""
    overrides = dict(vocab_size=vocab_size, loss_chunk_size=loss_chunk_size)
    if shape == "tiny":
        return TransNormerLLMConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                    **overrides)
    return TransNormerLLMConfig.from_preset(shape, **overrides)


def build(name: str, config: TransNormerLLMConfig, device: str) -> torch.nn.Module:
    """A randomly initialised bf16 model on `device`: TNL, or the parameter-matched Llama (SDPA)."""
    with torch.device(device):
        model = TransNormerLLMForCausalLM(config) if name == "tnl" else same_size_llama(config)
    if name == "llama":
        model.config._attn_implementation = "sdpa"
    return model.to(torch.bfloat16)


def _synchronize(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _fresh_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def _attempt(record: Recorder, args, row: dict, measure) -> dict:
    """Add `row` with measure()'s results and the peak memory, or with result "out of memory"."""
    _fresh_memory(args.device)
    try:
        row.update(result="ok", **measure())
    except torch.OutOfMemoryError:
        row["result"] = "out of memory"
    row["peak_gib"] = _peak_gib(args.device)
    return record.add(row)


def _set_checkpointing(model: torch.nn.Module, layers: int) -> None:
    """Checkpoint the first `layers` decoder layers (0: none)."""
    model.gradient_checkpointing_disable()
    if layers:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layer in model.model.layers[layers:]:
            layer.gradient_checkpointing = False


def _train_step_seconds(model, optimizer, rows: int, context: int, micro_steps: int, args) -> float:
    start = _synchronize(args.device)
    for _ in range(micro_steps):
        ids = torch.randint(3, model.config.vocab_size, (rows, context), device=args.device)
        (model(input_ids=ids, labels=ids, use_cache=False).loss / micro_steps).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return _synchronize(args.device) - start


def train_part(record: Recorder, args, config) -> None:
    for name in args.models:
        model = build(name, config, args.device).train()
        params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=args.device == "cuda")
        num_layers = config.num_hidden_layers
        for context in args.contexts:
            rows = max(1, args.micro_tokens // context)
            micro_steps = max(1, args.tokens_per_step // (rows * context))
            row = dict(part="train", model=name, params=params, context=context, rows=rows, micro_steps=micro_steps,
                       tokens_per_step=rows * context * micro_steps)
            for fraction in args.checkpoint_fractions:
                layers = round(fraction * num_layers)
                _set_checkpointing(model, layers)
                optimizer.zero_grad(set_to_none=True)
                _fresh_memory(args.device)
                try:
                    times = [_train_step_seconds(model, optimizer, rows, context, micro_steps, args)
                             for _ in range(args.warmup + args.steps)][args.warmup:]
                except torch.OutOfMemoryError:
                    optimizer.zero_grad(set_to_none=True)
                    row.setdefault("out_of_memory_with_checkpointed_layers", []).append(layers)
                    continue
                seconds = statistics.median(times)
                row.update(result="ok", checkpointed_layers=layers, step_s=round(seconds, 4),
                           tokens_per_s=round(row["tokens_per_step"] / seconds), peak_gib=_peak_gib(args.device))
                break
            else:
                row["result"] = "out of memory"
            record.add(row)
        del model, optimizer
        _fresh_memory(args.device)


def profile_part(record: Recorder, args, config) -> None:
    """One TNL training step at `--profile-context` under torch.profiler; the top kernels go to a text file."""
    from torch.profiler import ProfilerActivity, profile

    model = build("tnl", config, args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=args.device == "cuda")
    rows = max(1, args.micro_tokens // args.profile_context)
    for _ in range(2):
        _train_step_seconds(model, optimizer, rows, args.profile_context, 1, args)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as profiler:
        seconds = _train_step_seconds(model, optimizer, rows, args.profile_context, 1, args)
    averages = profiler.key_averages()
    sort_key = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    table = averages.table(sort_by=sort_key, row_limit=40)
    path = args.out.with_name(args.out.stem + "_profile.txt")
    path.write_text(f"{' '.join(sys.argv)}\nTNL {args.shape}, context {args.profile_context}, rows {rows}, "
                    f"step {seconds:.3f} s (under the profiler)\n\n{table}\n")
    device_time = (lambda event: event.self_device_time_total) if args.device == "cuda" else \
        (lambda event: event.self_cpu_time_total)
    total = sum(device_time(event) for event in averages) or 1
    top = sorted(averages, key=device_time, reverse=True)[:15]
    record.add(dict(part="profile", model="tnl", context=args.profile_context, rows=rows, table=path.name,
                    top=[dict(name=event.key[:80], ms=round(device_time(event) / 1e3, 2),
                              share=round(device_time(event) / total, 3)) for event in top]))
    del model, optimizer
    _fresh_memory(args.device)


@torch.no_grad()
def decode_part(record: Recorder, args, config) -> None:
    for name in args.models:
        model = build(name, config, args.device).eval()
        plan = [(batch, context) for batch in args.batches for context in args.decode_contexts]
        if name == "tnl":
            plan += [(batch, args.big_batch_context) for batch in args.big_batches]
        for batch, context in plan:

            def measure() -> dict:
                seconds, cache_bytes = decode_step_seconds(model, context, args.decode_steps, args.device, batch)
                return dict(ms_per_token=round(1000 * seconds, 3), tokens_per_s=round(batch / seconds, 1),
                            cache_gib=round(cache_bytes / 2**30, 4),
                            cache_mib_per_sequence=round(cache_bytes / batch / 2**20, 2))

            _attempt(record, args, dict(part="decode", model=name, context=context, batch=batch), measure)
        del model
        _fresh_memory(args.device)


def _generate_seconds(model, prompt: torch.Tensor, new_tokens: int, device: str, **kwargs) -> float:
    start = _synchronize(device)
    model.generate(prompt, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    return _synchronize(device) - start


def _compiled_step_seconds(step, model, batch: int, context: int, steps: int, device: str) -> float:
    """Median time of one compiled greedy step on a static cache standing at `context` tokens."""
    from transnormer_hf.cache_transnormer import TransNormerLLMStaticCache
    from transnormer_hf.modeling_transnormer import CACHE_FIELD

    cache = TransNormerLLMStaticCache(model.config)
    token = torch.ones(batch, 1, dtype=torch.int64, device=device)
    model(input_ids=token, use_cache=True, **{CACHE_FIELD: cache})  # eager: allocates the states at this batch
    cache.seen_tokens = context  # only moves the LRPE angles; the state's size does not depend on it
    times = []
    for index in range(3 + steps):  # warm-up: compile (first batch size), graph capture
        start = _synchronize(device)
        token = step(input_ids=token, use_cache=True, **{CACHE_FIELD: cache}).logits[:, -1:].argmax(-1)
        if index >= 3:
            times.append(_synchronize(device) - start)
    return statistics.median(times)


def _profile_compiled_step(step, model, args, steps: int = 20) -> dict:
    """GPU busy time and kernel count of the batch-1 compiled step, against its wall time: launch gaps or kernels?"""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    _compiled_step_seconds(step, model, 1, 1024, 2, args.device)  # warm (graph already captured for batch 1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        wall = _compiled_step_seconds(step, model, 1, 1024, steps, args.device)
    kernels = [event for event in profiler.key_averages() if event.device_type == DeviceType.CUDA]
    busy = sum(event.self_device_time_total for event in kernels) / 1e3  # ms over the profiled steps
    profiled_steps = 3 + steps + 1  # _compiled_step_seconds' warm-up and timed steps, and its eager first call
    top = sorted(kernels, key=lambda event: event.self_device_time_total, reverse=True)[:10]
    return dict(part="compiled_step_profile", model="tnl", batch=1, context=1024,
                wall_ms_per_step=round(1000 * wall, 3), gpu_busy_ms_per_step=round(busy / profiled_steps, 3),
                kernels_per_step=round(sum(event.count for event in kernels) / profiled_steps, 1),
                top=[dict(name=event.key[:80], ms_per_step=round(event.self_device_time_total / 1e3 / profiled_steps, 4),
                          count_per_step=round(event.count / profiled_steps, 1)) for event in top])


@torch.no_grad()
def static_part(record: Recorder, args, config) -> None:
    """The compiled decode step (torch.compile "reduce-overhead": CUDA graphs) at each context and batch; then
    generate() with cache_implementation="static" against the default cache, per token from two generation
    lengths, (t(short + n) - t(short)) / n, so the prefill and the first call's compile drop out."""
    model = build("tnl", config, args.device).eval()
    mode = "reduce-overhead" if args.device == "cuda" else None
    step = torch.compile(model, mode=mode, fullgraph=True, dynamic=False)
    for batch in args.batches:
        for context in args.decode_contexts:
            started = time.perf_counter()
            seconds = _compiled_step_seconds(step, model, batch, context, args.decode_steps, args.device)
            record.add(dict(part="compiled_step", model="tnl", context=context, batch=batch, mode=mode,
                            ms_per_token=round(1000 * seconds, 3), tokens_per_s=round(batch / seconds, 1),
                            wall_s=round(time.perf_counter() - started, 1)))
    if args.device == "cuda":
        record.add(_profile_compiled_step(step, model, args))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    short, extra = 8, args.generate_tokens
    for batch in args.static_batches:
        prompt = torch.randint(3, config.vocab_size, (batch, 16), device=args.device)
        for cache in ("static", "default"):
            kwargs = dict(cache_implementation="static") if cache == "static" else {}
            started = time.perf_counter()
            _generate_seconds(model, prompt, short, args.device, **kwargs)  # compiles the step for "static"
            first_call_s = time.perf_counter() - started
            short_s = min(_generate_seconds(model, prompt, short, args.device, **kwargs) for _ in range(2))
            long_s = min(_generate_seconds(model, prompt, short + extra, args.device, **kwargs) for _ in range(2))
            record.add(dict(part="generate", model="tnl", cache=cache, batch=batch, first_call_s=round(first_call_s, 1),
                            ms_per_token=round(1000 * (long_s - short_s) / extra, 3)))
    del model
    _fresh_memory(args.device)


@torch.no_grad()
def prefill_part(record: Recorder, args, config) -> None:
    for name in args.models:
        model = build(name, config, args.device).eval()
        ids = torch.randint(3, config.vocab_size, (1, args.prefill_tokens), device=args.device)

        def measure() -> dict:
            times = []
            for _ in range(1 + args.steps):
                start = _synchronize(args.device)
                model(input_ids=ids, use_cache=True, logits_to_keep=1)
                times.append(_synchronize(args.device) - start)
            seconds = statistics.median(times[1:])
            return dict(ms=round(1000 * seconds, 2), tokens_per_s=round(args.prefill_tokens / seconds))

        _attempt(record, args, dict(part="prefill", model=name, tokens=args.prefill_tokens), measure)
        del model
        _fresh_memory(args.device)


def longest_part(record: Recorder, args, config) -> None:
    """Batch 1, every layer checkpointed: the longest context whose training step fits, for each model."""
    for name in args.models:
        model = build(name, config, args.device).train()
        _set_checkpointing(model, config.num_hidden_layers)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=args.device == "cuda")
        for context in args.longest_contexts:
            optimizer.zero_grad(set_to_none=True)

            def measure() -> dict:
                _train_step_seconds(model, optimizer, 1, context, 1, args)  # warm-up (autotune at a new length)
                seconds = _train_step_seconds(model, optimizer, 1, context, 1, args)
                return dict(step_s=round(seconds, 3), tokens_per_s=round(context / seconds))

            if _attempt(record, args, dict(part="longest", model=name, context=context), measure)["result"] != "ok":
                break
        del model, optimizer
        _fresh_memory(args.device)


def plot(paths: list[Path]) -> list[Path]:
    """Tokens/s against context (training) and ms per token against context (eager and compiled decode), from the
    rows of one or more results JSONs; the PNGs go beside the first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    path = paths[0]
    rows = [row for each in paths for row in json.loads(each.read_text())["rows"]]
    written = []

    def context_ticks(axis, contexts) -> None:
        axis.set_xticks(sorted(contexts), [f"{context // 1024}K" for context in sorted(contexts)])
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    train = [row for row in rows if row["part"] == "train" and row.get("result") == "ok"]
    if train:
        figure, axis = plt.subplots(figsize=(6, 4))
        for name in sorted({row["model"] for row in train}):
            points = sorted((row["context"], row["tokens_per_s"]) for row in train if row["model"] == name)
            axis.plot(*zip(*points), marker="o", label=name.upper() if name == "tnl" else name.capitalize())
        axis.set(xscale="log", xlabel="context (tokens)", ylabel="training tokens/s", ylim=(0, None),
                 title="Training throughput (fwd + bwd + AdamW)")
        context_ticks(axis, {row["context"] for row in train})
        axis.legend()
        written.append(path.with_name(path.stem + "_train.png"))
        figure.tight_layout()
        figure.savefig(written[-1], dpi=120)
    decode = [row for row in rows if row["part"] == "compiled_step"
              or (row["part"] == "decode" and row.get("result") == "ok")]
    if decode:
        figure, axis = plt.subplots(figsize=(6, 4))
        series = sorted({(row["model"], row["part"], row["batch"]) for row in decode})
        for name, part, batch in series:
            points = sorted((row["context"], row["ms_per_token"]) for row in decode
                            if (row["model"], row["part"], row["batch"]) == (name, part, batch))
            if len(points) > 1:
                style = {"compiled_step": ":", "decode": "-"}[part] if name == "tnl" else "--"
                label = f"{'TNL' if name == 'tnl' else 'Llama'} {'compiled' if part == 'compiled_step' else 'eager'}"
                axis.plot(*zip(*points), marker="o", linestyle=style, label=f"{label}, batch {batch}")
        axis.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per decode step",
                 title="Decode step latency")
        context_ticks(axis, {row["context"] for row in decode})
        axis.legend(fontsize=8)
        written.append(path.with_name(path.stem + "_decode.png"))
        figure.tight_layout()
        figure.savefig(written[-1], dpi=120)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", type=Path, nargs="+", help="only draw the plots of existing results JSONs")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--shape", default="1B", choices=("tiny", "385M", "1B", "7B"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--models", nargs="+", default=["tnl", "llama"], choices=("tnl", "llama"))
    parser.add_argument("--vocab-size", type=int, default=64000)
    parser.add_argument("--loss-chunk-size", type=int, default=4096, help="TNL's chunked loss (0: logits + loss)")
    parser.add_argument("--contexts", nargs="+", type=int, default=[2048, 8192, 32768, 65536])
    parser.add_argument("--tokens-per-step", type=int, default=65536)
    parser.add_argument("--micro-tokens", type=int, default=32768)
    parser.add_argument("--checkpoint-fractions", nargs="+", type=float, default=[0.0, 0.5, 1.0])
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--profile-context", type=int, default=8192)
    parser.add_argument("--decode-contexts", nargs="+", type=int, default=[1024, 8192, 32768, 65536])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--decode-steps", type=int, default=10)
    parser.add_argument("--big-batch-context", type=int, default=32768)
    parser.add_argument("--big-batches", nargs="+", type=int, default=[256, 1024, 2048])
    parser.add_argument("--static-batches", nargs="+", type=int, default=[1], help="generate() batch sizes")
    parser.add_argument("--generate-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=32768)
    parser.add_argument("--longest-contexts", nargs="+", type=int,
                        default=[32768, 65536, 131072, 196608, 262144, 393216, 524288])
    args = parser.parse_args()
    if args.plot:
        for written in plot(args.plot):
            print(written)
        return 0
    if args.out is None:
        parser.error("--out is required (or --plot)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA device (use --device cpu --shape tiny for a smoke run)")
    import transformers
    import triton

    meta = dict(command=" ".join(["python", *sys.argv]), date=time.strftime("%Y-%m-%d"),
                device=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
                versions=dict(torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
                              python=platform.python_version()),
                settings=dict(dtype="bfloat16 weights", optimizer="AdamW (fused on CUDA)",
                              llama="same_size_llama: LlamaForCausalLM, SDPA, parameter-matched",
                              tnl_loss_chunk_size=args.loss_chunk_size))
    record = Recorder(args.out, meta)
    config = tnl_config(args.shape, args.vocab_size, args.loss_chunk_size)
    torch.manual_seed(0)
    parts = {"train": train_part, "profile": profile_part, "decode": decode_part, "static": static_part,
             "prefill": prefill_part, "longest": longest_part}
    for part in args.parts:
        try:
            parts[part](record, args, config)
        except Exception as error:  # one broken part must not lose the others' measurements
            traceback.print_exc()
            record.add(dict(part=part, error=repr(error)[:500]))
            _fresh_memory(args.device)
    try:
        for written in plot([args.out]):
            print(written)
    except ImportError:
        print("matplotlib missing: draw the plots later with --plot", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
