"""Benchmark SRMSNorm, the gated SRMSNorm and the one-token decode step on a CUDA GPU.

Times (median of `triton.testing.do_bench`) the Triton ops against torch eager (the references in
kernels/reference.py) and torch.compile of the same references, at TNL-1B shapes (hidden 2048, bf16):
- SRMSNorm and gated SRMSNorm, forward and forward+backward, 16K-64K tokens. The gate is the strided
  `u` view of a (tokens, 4 * 2048) qkvu projection, as in the model.
- the decode step at B in {1, 8, 64}, H = 16, d_v = 128, d_k in {128, 256} (256: LRPE layers), fp32 state;
  eagerly (rotating over enough states to miss L2) and as a CUDA graph of 16 steps on 16 different
  states (one per layer), reported per step.
It also checks accuracy against float64 on the GPU and that torch.compile(fullgraph=True) traces the ops.

    python benchmarks/norm_decode.py --out benchmarks/results/norm_decode_h200.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import subprocess
import sys

import torch
import triton
from triton.testing import do_bench

from attention import copy_bandwidth
from transnormer_hf.kernels import (
    gated_srms_norm,
    gated_srms_norm_ref,
    lightning_attn_recurrent_ref,
    lightning_attn_step,
    srms_norm,
    srms_norm_ref,
)

_norm_kernels = importlib.import_module("transnormer_hf.kernels.triton_srms_norm")
_decode_kernels = importlib.import_module("transnormer_hf.kernels.triton_decode")

HIDDEN = 2048
HEADS = 16
VALUE_DIM = 128
EPS = 1e-6
L2_BYTES = 50 * 2**20


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # microseconds


def norm_inputs(tokens: int, dtype=torch.bfloat16):
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=dtype)
    gate = torch.randn(tokens, 4 * HIDDEN, device="cuda", dtype=dtype)[:, 3 * HIDDEN :]  # strided, like u
    dy = torch.randn(tokens, HIDDEN, device="cuda", dtype=dtype)
    return x, gate, dy


def norm_impls():
    eager_plain = lambda x, g: srms_norm_ref(x, EPS)  # noqa: E731
    eager_gated = lambda x, g: gated_srms_norm_ref(x, g, EPS)  # noqa: E731
    return {
        "srms_norm": {
            "triton": lambda x, g: srms_norm(x, EPS, backend="triton"),
            "torch": eager_plain,
            "torch.compile": torch.compile(eager_plain, dynamic=True),
        },
        "gated_srms_norm": {
            "triton": lambda x, g: gated_srms_norm(x, g, EPS, backend="triton"),
            "torch": eager_gated,
            "torch.compile": torch.compile(eager_gated, dynamic=True),
        },
    }


def check_norm_accuracy() -> dict:
    x, gate, dy = norm_inputs(4096)
    x, gate = x.requires_grad_(), gate.detach().clone().requires_grad_()
    x64, gate64 = x.detach().double().requires_grad_(), gate.detach().double().requires_grad_()
    result = {}
    for name, fn, ref_fn, inputs, inputs64 in (
        ("srms_norm", lambda: srms_norm(x, EPS, backend="triton"), lambda: srms_norm_ref(x64, EPS), (x,), (x64,)),
        ("gated_srms_norm", lambda: gated_srms_norm(x, gate, EPS, backend="triton"),
         lambda: gated_srms_norm_ref(x64, gate64, EPS), (x, gate), (x64, gate64)),
    ):
        out, ref = fn(), ref_fn()
        grads = torch.autograd.grad(out, inputs, dy)
        grads64 = torch.autograd.grad(ref, inputs64, dy.double())
        result[name] = {"y": rel_err(out, ref), **{f"d{i}": rel_err(g, r) for i, (g, r) in enumerate(zip(grads, grads64))}}
    return result


def check_fullgraph() -> str:
    def layer_tail(o, u):
        return (gated_srms_norm(o, u, EPS, backend="triton") + srms_norm(o, EPS, backend="triton")).float().sum()

    o = torch.randn(2, 64, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn(2, 64, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    try:
        torch.compile(layer_tail, fullgraph=True)(o, u).backward()
        q = torch.randn(4, 1, HEADS, 128, device="cuda", dtype=torch.bfloat16)
        state = torch.randn(4, HEADS, 128, VALUE_DIM, device="cuda")
        rates = torch.rand(HEADS, device="cuda")
        step = torch.compile(lambda: lightning_attn_step(q, q, q, rates, state, backend="triton"), fullgraph=True)
        step()
        return "ok"
    except Exception as error:  # recorded, not fatal: the timings still matter
        return f"failed: {type(error).__name__}: {str(error)[:300]}"


def run_norm(token_counts: list[int]) -> list[dict]:
    rows = []
    impls = norm_impls()
    for tokens in token_counts:
        x, gate, dy = norm_inputs(tokens)
        for op, variants in impls.items():
            gated = op == "gated_srms_norm"
            # bytes moved at least once: fwd reads x (and gate), writes y; bwd reads dy, x (and gate), writes dx (and dgate)
            elems, size = tokens * HIDDEN, x.element_size()
            floor_fwd = elems * size * (3 if gated else 2)
            floor_fwd_bwd = floor_fwd + elems * size * (5 if gated else 3)
            for impl, fn in variants.items():
                xg, gg = x.detach().requires_grad_(), gate.detach().requires_grad_()
                inputs = (xg, gg) if gated else (xg,)
                with torch.no_grad():
                    fwd = bench(lambda: fn(x, gate))
                fwd_bwd = bench(lambda: torch.autograd.grad(fn(xg, gg), inputs, dy))
                rows.append({
                    "op": op, "impl": impl, "tokens": tokens, "hidden": HIDDEN, "dtype": "bf16",
                    "fwd_us": round(fwd, 2), "fwd_bwd_us": round(fwd_bwd, 2),
                    "fwd_GBps": round(floor_fwd / fwd / 1e3, 1), "fwd_bwd_GBps": round(floor_fwd_bwd / fwd_bwd / 1e3, 1),
                })
                print(f"{op:16s} {impl:14s} T={tokens:6d} fwd {fwd:8.1f} us ({rows[-1]['fwd_GBps']:6.0f} GB/s)"
                      f"  fwd+bwd {fwd_bwd:8.1f} us ({rows[-1]['fwd_bwd_GBps']:6.0f} GB/s)", flush=True)
    return rows


def decode_inputs(batch: int, key_dim: int, count: int):
    """`count` independent (q, k, v, state) sets, so eager timing rotates through memory larger than L2."""
    sets = []
    for _ in range(count):
        q, k = (torch.randn(batch, 1, HEADS, key_dim, device="cuda", dtype=torch.bfloat16) * key_dim**-0.5 for _ in range(2))
        v = torch.randn(batch, 1, HEADS, VALUE_DIM, device="cuda", dtype=torch.bfloat16)
        sets.append((q, k, v, torch.randn(batch, HEADS, key_dim, VALUE_DIM, device="cuda")))
    return sets


def check_decode_accuracy(batch: int, key_dim: int, rates: torch.Tensor) -> dict:
    q, k, v, state = decode_inputs(batch, key_dim, 1)[0]
    out, new_state = lightning_attn_step(q, k, v, rates, state, backend="triton")
    ref_out, ref_state = lightning_attn_recurrent_ref(
        q.double(), k.double(), v.double(), rates, initial_state=state.double(), output_final_state=True
    )
    return {"o": rel_err(out, ref_out), "state": rel_err(new_state, ref_state)}


def run_decode(batches: list[int], key_dims: list[int], bandwidth: float) -> list[dict]:
    """The step eager and under CUDA graphs; its floor: the fp32 state read and written once at `bandwidth` B/s."""
    rows = []
    rates = torch.rand(HEADS, device="cuda") * 0.5
    torch_step = lambda q, k, v, s: lightning_attn_step(q, k, v, rates, s, backend="torch")  # noqa: E731
    impls = {
        "triton": lambda q, k, v, s: lightning_attn_step(q, k, v, rates, s, backend="triton"),
        "torch": torch_step,
        "torch.compile": torch.compile(torch_step, dynamic=True),
    }
    layers = 16
    for key_dim in key_dims:
        for batch in batches:
            state_bytes = batch * HEADS * key_dim * VALUE_DIM * 4
            count = max(layers, min(256, -(-4 * L2_BYTES // state_bytes)))
            sets = decode_inputs(batch, key_dim, count)
            accuracy = check_decode_accuracy(batch, key_dim, rates)
            for impl, fn in impls.items():
                position = [0]

                def eager_step():
                    position[0] = (position[0] + 1) % count
                    fn(*sets[position[0]])

                eager = bench(eager_step)
                for index in range(layers):  # warm up (autotune, compile) outside the capture
                    fn(*sets[index])
                torch.cuda.synchronize()
                try:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        for index in range(layers):
                            fn(*sets[index])
                    graphed = bench(graph.replay) / layers
                except Exception as error:
                    print(f"graph capture failed for {impl}: {error}", flush=True)
                    graphed = float("nan")
                floor_us = 2 * state_bytes / bandwidth * 1e6
                rows.append({
                    "op": "lightning_attn_step", "impl": impl, "batch": batch, "heads": HEADS, "key_dim": key_dim,
                    "value_dim": VALUE_DIM, "eager_us": round(eager, 2), "graph_us_per_step": round(graphed, 2),
                    "state_floor_us": round(floor_us, 2), "graph_GBps": round(2 * state_bytes / graphed / 1e3, 1),
                    **({"rel_err_o": accuracy["o"], "rel_err_state": accuracy["state"]} if impl == "triton" else {}),
                })
                print(f"decode {impl:14s} B={batch:3d} dk={key_dim} eager {eager:7.1f} us  graph {graphed:7.2f} us/step"
                      f"  floor {floor_us:6.2f} us", flush=True)
            del sets
    return rows


class _LauncherFunction(torch.autograd.Function):
    """The same kernels behind a plain autograd.Function (no custom op): isolates the operator dispatch cost."""

    @staticmethod
    def forward(ctx, x, gate):
        y, rstd = _norm_kernels._srms_norm_fwd(x, gate, EPS)
        ctx.save_for_backward(x, gate, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gate, rstd = ctx.saved_tensors
        grads = _norm_kernels._srms_norm_bwd(dy, x, gate, rstd)
        return grads[0], (grads[1] if gate is not None else None)


def run_breakdown(token_counts: list[int]) -> list[dict]:
    """Kernel-only times (launchers called directly) and per-call overhead of each wrapper at a tiny size."""
    rows = []
    for tokens in [64, *token_counts]:
        x, gate, dy = norm_inputs(tokens)
        for gated in (False, True):
            g = gate if gated else None
            _, rstd = _norm_kernels._srms_norm_fwd(x, g, EPS)
            xg, gg = x.detach().requires_grad_(), gate.detach().requires_grad_()
            inputs = (xg, gg) if gated else (xg,)
            op = (lambda a, b: gated_srms_norm(a, b, EPS, backend="triton")) if gated else (
                lambda a, b: srms_norm(a, EPS, backend="triton"))
            row = {
                "op": "gated_srms_norm" if gated else "srms_norm", "tokens": tokens,
                "kernel_fwd_us": bench(lambda: _norm_kernels._srms_norm_fwd(x, g, EPS)),
                "kernel_bwd_us": bench(lambda: _norm_kernels._srms_norm_bwd(dy, x, g, rstd)),
                "public_op_fwd_bwd_us": bench(lambda: torch.autograd.grad(op(xg, gg), inputs, dy)),
                "autograd_function_fwd_bwd_us": bench(
                    lambda: torch.autograd.grad(_LauncherFunction.apply(xg, gg if gated else None), inputs, dy)),
            }
            rows.append({key: round(value, 2) if isinstance(value, float) else value for key, value in row.items()})
            print(rows[-1], flush=True)
    rates = torch.rand(HEADS, device="cuda")
    for key_dim in (128, 256):
        q, k, v, state = decode_inputs(1, key_dim, 1)[0]
        rows.append({
            "op": "lightning_attn_step", "batch": 1, "key_dim": key_dim,
            "launcher_us": round(bench(lambda: _decode_kernels._lightning_attn_step(q, k, v, rates, state, 1.0)), 2),
            "public_op_us": round(bench(lambda: lightning_attn_step(q, k, v, rates, state, backend="triton")), 2),
        })
        print(rows[-1], flush=True)
    return rows


def environment() -> dict:
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        smi = f"nvidia-smi unavailable: {error}"
    return {
        "gpu": torch.cuda.get_device_name(), "nvidia_smi": smi, "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": triton.__version__, "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--key-dims", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--sections", nargs="+", default=["decode", "norm", "breakdown"],
                        choices=["decode", "norm", "breakdown"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    result = {"environment": environment(), "copy_bandwidth_GBps": round(bandwidth / 1e9, 1)}
    print(result["environment"], "copy bandwidth (GB/s):", result["copy_bandwidth_GBps"], flush=True)
    result["fullgraph_compile"] = check_fullgraph()
    print("torch.compile(fullgraph=True):", result["fullgraph_compile"], flush=True)
    result["norm_accuracy_bf16_vs_float64"] = check_norm_accuracy()
    print("norm accuracy:", result["norm_accuracy_bf16_vs_float64"], flush=True)
    sections = {"decode": lambda: run_decode(args.batches, args.key_dims, bandwidth),
                "norm": lambda: run_norm(args.tokens), "breakdown": lambda: run_breakdown(args.tokens)}
    for section in args.sections:
        result[section] = sections[section]()
        with open(args.out, "w") as handle:  # after each section, so a run cut short keeps what it measured
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
