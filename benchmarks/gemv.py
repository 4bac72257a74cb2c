"""The decoding step's linear layers on one GPU: cuBLAS (F.linear; cublas and cublasLt) against this project's
few-row Triton GEMV (`kernels/triton_gemv.py`) under each launch config, at TNL-1B's shapes, in one run.

Each timing replays a CUDA graph of the product over 16 distinct weight copies (4 for lm_head), as a decoding step
meets 16 layers' weights that no cache holds, and reports microseconds per product beside the floor: the weight's
bytes at this GPU's measured copy bandwidth.

    python benchmarks/gemv.py --out benchmarks/results/gemv_h200.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton

from attention import copy_bandwidth

from transnormer_hf.kernels import gemv_ref, triton_gemv

SHAPES = {"qkvu": (8192, 2048, False), "out": (2048, 2048, False), "l1*l2": (5632, 2048, True),
          "l1": (5632, 2048, False), "l3": (2048, 5632, False), "lm_head": (64000, 2048, False)}
CONFIGS = [(bn, bk, 4, stages) for bn in (16, 32, 64) for bk in (128, 256, 512) for stages in (3, 4)
           if bn * bk <= 32768]


def launch(x, weight, gate, config):
    """The library's GEMV launcher under an explicit (BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    shipped = triton_gemv._launch_config
    triton_gemv._launch_config = lambda *_: config
    try:
        return triton_gemv.gemv(x, weight, gate)
    finally:
        triton_gemv._launch_config = shipped


def us_per_call(fn, weights, reps: int = 20) -> float:
    """Microseconds per call of fn(weight, gate) over the weight copies, replayed from one CUDA graph."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for pair in weights:
            fn(*pair)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for pair in weights:
            fn(*pair)
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps / len(weights) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    record = {"command": f"python benchmarks/gemv.py --out {args.out}", "gpu": torch.cuda.get_device_name(),
              "versions": {"torch": torch.__version__, "triton": triton.__version__},
              "copy_TBps": bandwidth / 1e12, "rows": []}
    for name, (n, k, gated) in SHAPES.items():
        copies = 4 if name == "lm_head" else 16
        weights = [(weight, torch.randn_like(weight) if gated else None) for weight in
                   (torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies))]
        for rows in (1, 8):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            row = {"shape": name, "N": n, "K": k, "rows": rows,
                   "floor_us": (2 if gated else 1) * n * k * 2 / bandwidth * 1e6}
            for library in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(library)
                row[f"{library}_us"] = us_per_call(lambda w, g: gemv_ref(x, w, g), weights)
            torch.backends.cuda.preferred_blas_library("cublas")
            row["shipped_config"] = triton_gemv._launch_config(n, k, gated, 2, x.device)
            row["shipped_us"] = us_per_call(lambda w, g: triton_gemv.gemv(x, w, g), weights)
            row["configs"] = {}
            for config in CONFIGS:
                try:
                    row["configs"][str(config)] = us_per_call(lambda w, g: launch(x, w, g, config), weights)
                except triton.runtime.errors.OutOfResources:
                    continue
            print({key: value for key, value in row.items() if key != "configs"}, flush=True)
            record["rows"].append(row)
            with open(args.out, "w") as f:
                json.dump(record, f, indent=1)
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
