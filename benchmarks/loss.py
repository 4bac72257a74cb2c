"""The causal-LM loss of TNL-1B's head at 32K tokens: unfused (logits + cross-entropy), chunked with torch rows, and
chunked with the fused Triton rows; forward+backward time, peak extra memory and error against an fp32 reference.

    python benchmarks/loss.py --out benchmarks/results/loss_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from transnormer_hf.kernels import linear_cross_entropy


def unfused(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=64000)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    hidden = (torch.randn(args.tokens, args.hidden_size, device="cuda") / 4).bfloat16().requires_grad_()
    weight = (torch.randn(args.vocab_size, args.hidden_size, device="cuda") / 16).bfloat16().requires_grad_()
    labels = torch.randint(0, args.vocab_size, (args.tokens,), device="cuda")
    labels[::7] = -100

    def reference():  # fp32 weights and hidden: the yardstick for the bf16 variants
        h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
        loss = linear_cross_entropy(h32, w32, labels, chunk_size=args.chunk_size, backend="torch")
        return (loss, *torch.autograd.grad(loss, (h32, w32)))

    ref = reference()
    variants = {
        "unfused": lambda: unfused(hidden, weight, labels),
        "chunked_torch": lambda: linear_cross_entropy(hidden, weight, labels, chunk_size=args.chunk_size, backend="torch"),
        "chunked_triton": lambda: linear_cross_entropy(hidden, weight, labels, chunk_size=args.chunk_size,
                                                       backend="triton"),
    }
    rows = []
    for name, loss_fn in variants.items():
        def step():
            loss = loss_fn()
            return (loss, *torch.autograd.grad(loss, (hidden, weight)))

        out = step()
        errors = {key: (((got.double() - want.double()).norm() / want.double().norm()).item())
                  for key, got, want in zip(("loss", "d_hidden", "d_weight"), out, ref)}
        del out
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
        ms = do_bench(step, warmup=3, rep=20, return_mode="median")
        row = dict(variant=name, fwd_bwd_ms=round(ms, 2), extra_peak_GiB=round(peak / 2**30, 2),
                   rel_err_vs_fp32={key: float(f"{value:.2e}") for key, value in errors.items()})
        print(json.dumps(row), flush=True)
        rows.append(row)
    meta = dict(command=" ".join(["python", *sys.argv]), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                date=time.strftime("%Y-%m-%d"), tokens=args.tokens, hidden_size=args.hidden_size,
                vocab_size=args.vocab_size, chunk_size=args.chunk_size, dtype="bfloat16")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
