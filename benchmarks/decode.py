"""Generation speed through `generate()`: TNL's fast and default paths against a same-size Llama's static and
default caches, in one run, within a few minutes on one GPU (issue 17).

    python benchmarks/decode.py --out benchmarks/results/decode_1b_h200.json
    python benchmarks/decode.py --plot benchmarks/results/decode_1b_h200.json         # the plot only, any machine
    python benchmarks/decode.py --device cpu --shape tiny --contexts 64 256 --batches 1 2 --big-batch 4 \\
        --out /tmp/decode_smoke.json                                                     # a CPU smoke run

Paths (TNL): "graphs" is `generate()` with no flags, which on CUDA runs `decode_with_cuda_graphs` (each step
replayed from one CUDA graph, the stop check read a step late); "graphs, cache passed" the same loop when the caller
passes the cache in and so keeps it (it then checks every step, so the cache holds exactly transformers' tokens);
"compiled" is transformers' loop on `cache_implementation="static"` (generate() compiles the step with CUDA graphs:
the fast path before the graph loop) and "eager" transformers' loop on the default cache (`cuda_graph_decoding=False`:
the default before); "graphs, cuBLAS linears" is "graphs" with every linear layer through cuBLAS (the few-row Triton
GEMV of `kernels.gemv` off). Llama's "static" is transformers' StaticCache (compiled the same way), its "default" the
DynamicCache. Every cache starts at the row's context without a prefill (TNL: the states of one step and the token
counter set to the context, handed to generate() as the cache it builds itself, except on "graphs, cache passed";
Llama: random keys and values), so each row costs two short generations: per-token time is
(t(80 new tokens) - t(16 new tokens)) / 64, greedy, so the prefill of the one fed token and the compile drop out;
each t is the fastest of `--repeats` runs (the row's cache is made anew before each, outside the timing).
The first call of each (model, path, batch) is timed separately: `first_call_s` minus a warm call of the same length
is the first-call overhead (compilation, CUDA-graph capture, autotuning).

Also measured: a device-to-device copy's bandwidth; the decode kernels' state bandwidth at the large batch (one
layer, in place and out of place); kernels per generated token and GPU-busy fraction (torch.profiler) of TNL's
default path before (the unfused step through torch.library dispatch, as before issue 17) and after, of its fast
path and of Llama's static path. Every row is written to the JSON as soon as it is measured; out of memory is
recorded; rows are skipped once `--budget-s` has passed, so one run fits its time slot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch
from model import Recorder, build, tnl_config

from transnormer_hf import TransNormerLLMCache, TransNormerLLMStaticCache
from transnormer_hf import kernels as tnl_kernels
from transnormer_hf import modeling_transnormer as modeling
from transnormer_hf.modeling_transnormer import CACHE_FIELD

SHORT, LONG = 16, 80  # new tokens of the two timed generations


def _sync(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


# path -> (cache class, config.cuda_graph_decoding, whether the cache is passed in as the caller's, whether a step's
# few rows take the Triton GEMV: kernels.gemv, off = every linear through cuBLAS as before it)
TNL_PATHS = {
    "graphs": (TransNormerLLMCache, True, False, True),
    "graphs, cuBLAS linears": (TransNormerLLMCache, True, False, False),
    "graphs, cache passed": (TransNormerLLMCache, True, True, True),
    "compiled": (TransNormerLLMStaticCache, False, False, True),
    "eager": (TransNormerLLMCache, False, False, True),
}


def _tnl_cache(model, path: str, batch: int, context: int, reuse: dict):
    """generate() arguments with a TNL cache standing at `context` tokens; the static one is reused per batch (fixed
    addresses, no recapture). Unless the path passes it in, the cache goes to generate() as the one it builds itself
    (the model instance's `_prepare_cache_for_generation`), which is what a long prompt's prefill leaves it."""
    cache_class, graphs, passed, triton_gemv = TNL_PATHS[path]
    model.config.cuda_graph_decoding = graphs
    modeling.GEMV_MAX_ROWS = tnl_kernels.GEMV_MAX_ROWS if triton_gemv else 0
    vars(model).pop("_prepare_cache_for_generation", None)  # the previous row's
    if cache_class is TransNormerLLMStaticCache and batch in reuse:
        cache = reuse[batch]
    else:
        cache = cache_class(model.config)
        model(input_ids=torch.ones(batch, 1, dtype=torch.int64, device=model.device), use_cache=True,
              **{CACHE_FIELD: cache})
        if cache_class is TransNormerLLMStaticCache:
            reuse[batch] = cache
    cache.seen_tokens = context  # only moves the LRPE angles: the state's size does not depend on it
    if passed:
        return {CACHE_FIELD: cache}, cache.state_bytes
    model._prepare_cache_for_generation = lambda generation_config, model_kwargs, *args, **kwargs: (
        model_kwargs.__setitem__(CACHE_FIELD, cache))
    return {"cache_implementation": "static"} if cache_class is TransNormerLLMStaticCache else {}, cache.state_bytes


def _llama_cache(model, path: str, batch: int, context: int, reuse: dict):
    """A Llama cache holding `context` random keys and values per layer; the static one is reused per row."""
    from transformers import DynamicCache, StaticCache

    config = model.config
    heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    key = (batch, context)
    if path == "static":
        if key not in reuse:  # one static cache at a time: the last row's may be tens of GiB
            reuse.clear()
            _free(model.device.type)
            reuse[key] = StaticCache(config=config, max_cache_len=context + LONG + 8)
        cache = reuse[key]
        cache.reset()
    else:
        cache = DynamicCache(config=config)
    positions = torch.arange(context, device=model.device)
    for layer in range(config.num_hidden_layers):
        keys = torch.randn(batch, heads, context, head_dim, dtype=model.dtype, device=model.device)
        cache.update(keys, torch.randn_like(keys), layer, {"cache_position": positions})
    cache_bytes = 2 * config.num_hidden_layers * batch * heads * context * head_dim * model.dtype.itemsize
    return {CACHE_FIELD: cache}, cache_bytes


def _generate_s(model, make_cache, batch: int, context: int, new_tokens: int) -> tuple[float, int]:
    """Seconds of one greedy generate() of `new_tokens` from a cache at `context`; and the cache's bytes."""
    cache_kwargs, cache_bytes = make_cache(batch, context)
    ids = torch.randint(3, model.config.vocab_size, (batch, context + 1), device=model.device)
    start = _sync(model.device.type)
    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, **cache_kwargs)
    return _sync(model.device.type) - start, cache_bytes


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _before_issue_17(model):
    """The decode step as it was: q/k feature map, LRPE and the step as separate kernels, each Triton kernel entered
    through torch.library dispatch."""
    mixers = [layer.token_mixer for layer in model.model.layers]
    saved = [mixer.step_activation for mixer in mixers]
    traced = tnl_kernels._traced
    for mixer in mixers:
        mixer.step_activation = None
    tnl_kernels._traced = lambda *tensors: True
    try:
        yield
    finally:
        tnl_kernels._traced = traced
        for mixer, activation in zip(mixers, saved):
            mixer.step_activation = activation


def _profile(model, make_cache, batch: int, context: int) -> dict:
    """Kernels per generated token and the GPU-busy fraction of one warm `SHORT`-token generate()."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    _generate_s(model, make_cache, batch, context, SHORT)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        wall, _ = _generate_s(model, make_cache, batch, context, SHORT)
    kernels = [event for event in profiler.key_averages() if event.device_type == DeviceType.CUDA]
    busy = sum(event.self_device_time_total for event in kernels) / 1e6  # seconds
    top = sorted(kernels, key=lambda event: event.self_device_time_total, reverse=True)[:8]
    return dict(kernels_per_token=round(sum(event.count for event in kernels) / SHORT, 1),
                gpu_busy_fraction=round(busy / wall, 3), profiled_ms_per_token=round(1000 * wall / SHORT, 3),
                top=[dict(name=event.key[:70], us_per_token=round(event.self_device_time_total / SHORT, 1))
                     for event in top])


def copy_bandwidth(record: Recorder, args) -> float | None:
    """Device-to-device copy bandwidth (read + write bytes per second) of a 2 GiB buffer: the bound of a decode step."""
    if args.device != "cuda":
        return None
    source = torch.empty(2**29, dtype=torch.float32, device="cuda")
    target = torch.empty_like(source)
    target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 5
    bandwidth = 2 * source.numel() * 4 / seconds
    record.add(dict(part="copy_bandwidth", gib=2, tb_per_s=round(bandwidth / 1e12, 3)))
    del source, target
    _free("cuda")
    return bandwidth


def kernel_bandwidth(record: Recorder, args, config, copy_bps: float | None) -> None:
    """State bandwidth of the decode kernels alone at the large batch, one layer without LRPE (d_k = d_v = D)."""
    if args.device != "cuda":
        return
    heads, dim, batch = config.num_attention_heads, config.head_dim, args.big_batch
    q, k, v = (torch.randn(batch, 1, heads, dim, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    rates = torch.rand(heads, device="cuda")
    state = torch.zeros(batch, heads, dim, dim, device="cuda")
    variants = {
        "lightning_attn_step (out of place)": lambda: tnl_kernels.lightning_attn_step(q, k, v, rates, state),
        "lightning_attn_step_fused (out of place)": lambda: tnl_kernels.lightning_attn_step_fused(
            q, k, v, rates, state, activation=config.hidden_act),
        "lightning_attn_step_fused (in place)": lambda: tnl_kernels.lightning_attn_step_fused(
            q, k, v, rates, state, activation=config.hidden_act, out_state=state),
    }
    for name, step in variants.items():
        try:
            step()  # autotune
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                step()
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3 / 5
            bandwidth = 2 * state.numel() * 4 / seconds
            record.add(dict(part="kernel_bandwidth", kernel=name, batch=batch, state_gib=round(state.numel() * 4 / 2**30, 2),
                            ms=round(1000 * seconds, 3), tb_per_s=round(bandwidth / 1e12, 3),
                            of_copy=round(bandwidth / copy_bps, 3) if copy_bps else None))
        except torch.OutOfMemoryError:
            record.add(dict(part="kernel_bandwidth", kernel=name, batch=batch, result="out of memory"))
        _free("cuda")


class Runner:
    """generate() timing for one (model, path): its reused caches and the batch sizes (shapes) it has warmed up."""

    def __init__(self, model, name: str, path: str) -> None:
        self.model, self.name, self.path = model, name, path
        self.reuse: dict = {}
        self.warm: set = set()
        fill = _tnl_cache if name == "tnl" else _llama_cache
        self.make_cache = lambda batch, context: fill(model, path, batch, context, self.reuse)

    def warm_key(self, batch: int, context: int) -> tuple:
        # Llama's static cache changes shape with the context (a recompile); TNL's states and eager paths do not.
        return (batch, context) if (self.name, self.path) == ("llama", "static") else (batch,)

    def row(self, record: Recorder, args, batch: int, context: int, copy_bps: float | None, started: float) -> None:
        """Per-token generate() time at (batch, context), and the first call's time at a new shape."""
        row = dict(part="generate", model=self.name, path=self.path, batch=batch, context=context)
        if time.perf_counter() - started > args.budget_s:
            record.add(dict(row, result="skipped: time budget"))
            return
        try:
            key = self.warm_key(batch, context)
            if key not in self.warm:  # compile, capture, autotune
                first, _ = _generate_s(self.model, self.make_cache, batch, context, SHORT)
                self.warm.add(key)
                row["first_call_s"] = round(first, 2)
            # the fastest of a few runs of each length: one run's host jitter moved batch-1 rows by 0.1-0.3 ms
            short, cache_bytes = min(_generate_s(self.model, self.make_cache, batch, context, SHORT)
                                     for _ in range(args.repeats))
            long = min(_generate_s(self.model, self.make_cache, batch, context, LONG)[0] for _ in range(args.repeats))
            seconds = (long - short) / (LONG - SHORT)
            row.update(result="ok", ms_per_token=round(1000 * seconds, 3), tokens_per_s=round(batch / seconds, 1),
                       cache_gib=round(cache_bytes / 2**30, 3))
            if "first_call_s" in row:
                row["first_call_overhead_s"] = round(row["first_call_s"] - short, 2)
            if self.name == "tnl" and copy_bps:  # the states are read and written once per step
                row["state_tb_per_s"] = round(2 * cache_bytes / seconds / 1e12, 3)
                row["state_of_copy"] = round(2 * cache_bytes / seconds / copy_bps, 3)
        except torch.OutOfMemoryError:
            row["result"] = "out of memory"
            self.reuse.clear()
        _free(args.device)
        record.add(row)

    def profile(self, record: Recorder, args, started: float) -> None:
        """Kernels per token and GPU-busy fraction at batch 1 and the first context; TNL's default path also before."""
        if args.device != "cuda" or time.perf_counter() - started > args.budget_s:
            return
        context = args.contexts[0]
        row = dict(part="profile", model=self.name, path=self.path, batch=1, context=context)
        record.add(dict(row, code="now", **_profile(self.model, self.make_cache, 1, context)))
        if (self.name, self.path) == ("tnl", "eager"):
            with _before_issue_17(self.model):
                record.add(dict(row, code="before issue 17", **_profile(self.model, self.make_cache, 1, context)))


def plot(path: Path) -> Path:
    """ms per generated token against context, one line per (model, path, batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in json.loads(path.read_text())["rows"]
            if row["part"] == "generate" and row.get("result") == "ok"]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(row["model"], row["path"], row["batch"]) for row in rows}):
        points = sorted((row["context"], row["ms_per_token"]) for row in rows
                        if (row["model"], row["path"], row["batch"]) == key)
        style = "-" if key[0] == "tnl" else "--"
        axis.plot(*zip(*points), marker="o", linestyle=style, label=f"{key[0].upper()} {key[1]}, batch {key[2]}")
    axis.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per generated token (generate())",
             title="Decode through generate(): TNL vs same-size Llama")
    axis.legend(fontsize=7)
    out = path.with_suffix(".png")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path, help="only draw the plot of an existing results JSON")
    parser.add_argument("--shape", default="1B", choices=("tiny", "385M", "1B", "7B"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--vocab-size", type=int, default=64000)
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 8192, 32768])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--big-batch", type=int, default=2048, help="TNL's graphs and eager paths at the last context")
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip the rows left after this many seconds")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each generation length; the fastest counts")
    args = parser.parse_args()
    if args.plot:
        print(plot(args.plot))
        return 0
    if args.out is None:
        parser.error("--out is required (or --plot)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA device (use --device cpu --shape tiny for a smoke run)")
    import transformers
    import triton

    started = time.perf_counter()
    meta = dict(command=" ".join(["python", *sys.argv]), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                device=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
                versions=dict(torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
                              python=platform.python_version()),
                settings=dict(dtype="bfloat16 weights, random init", decoding="greedy",
                              per_token=f"(t({LONG} new) - t({SHORT} new)) / {LONG - SHORT}, each t the fastest "
                                        f"of {args.repeats} runs",
                              llama="same_size_llama: LlamaForCausalLM, SDPA, parameter-matched"))
    record = Recorder(args.out, meta)
    config = tnl_config(args.shape, args.vocab_size, 0)
    torch.manual_seed(0)
    copy_bps = copy_bandwidth(record, args)
    kernel_bandwidth(record, args, config, copy_bps)
    models = {name: build(name, config, args.device).eval() for name in ("tnl", "llama")}
    for model in models.values():
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    runners = [*(Runner(models["tnl"], "tnl", path) for path in TNL_PATHS),
               Runner(models["llama"], "llama", "static"), Runner(models["llama"], "llama", "default")]
    with torch.no_grad():
        for index, batch in enumerate(args.batches):  # every path at one batch size before the next batch size
            for runner in runners:
                for context in args.contexts:
                    runner.row(record, args, batch, context, copy_bps, started)
            if index == 0:
                for runner in runners:
                    runner.profile(record, args, started)
        for runner in runners:  # TNL's graph loop and transformers' eager loop at the large batch
            if (runner.name, runner.path) in (("tnl", "graphs"), ("tnl", "eager")):
                runner.row(record, args, args.big_batch, args.contexts[-1], copy_bps, started)
    record.add(dict(part="total", seconds=round(time.perf_counter() - started, 1)))
    try:
        print(plot(args.out))
    except ImportError:
        print("matplotlib missing: draw the plot later with --plot", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
