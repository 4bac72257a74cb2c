"""One whole TNL-1B decoder layer, forward+backward: on this project's kernels against the same layer on fla's op.

The layer is `TransNormerLLMDecoderLayer` (token norm, qkvu projection, SiLU, LRPE on layer 0, Lightning
Attention, gated SRMSNorm, out projection, SGLU) in bf16 on CUDA. Variants, timed in one process:
- `ours`: the Triton kernels (attention, SRMSNorm, gated norm);
- `fla`: the same layer with the attention op replaced by fla's `chunk_simple_gla` (g_gamma=-rate,
  scale=1.0) and the norms on the torch path, i.e. what a TNL layer built on fla's op computes;
- `torch`: the torch reference path everywhere (CPU path, for scale).

    python benchmarks/layer.py --tokens 16384 --out benchmarks/results/layer_1b_h100.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from pathlib import Path

import torch

from transnormer_hf import TransNormerLLMConfig
from transnormer_hf import modeling_transnormer as modeling


def _fla_attention(q, k, v, decay_rates, *, scale=1.0, initial_state=None, output_final_state=False,
                   cu_seqlens=None, output_dtype=None, backend="auto", context_parallel=None):
    """fla's chunk_simple_gla in the place of `kernels.lightning_attn` (bf16 layers: no fp32 output, one GPU)."""
    from fla.ops.simple_gla import chunk_simple_gla

    if output_dtype not in (None, q.dtype) or context_parallel is not None:
        raise ValueError("the fla stand-in takes neither output_dtype nor context_parallel")

    return chunk_simple_gla(q, k, v, g_gamma=-decay_rates, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def time_layer(variant: str, tokens: int, layer_idx: int, batch: int) -> dict:
    """Median fwd+bwd milliseconds and peak memory of one 1B layer in `variant`."""
    from triton.testing import do_bench

    backend = "torch" if variant in ("torch", "fla") else "triton"
    config = TransNormerLLMConfig.from_preset("1B", attention_backend=backend)
    layer = modeling.TransNormerLLMDecoderLayer(config, layer_idx).to("cuda", torch.bfloat16)
    original = modeling.lightning_attn
    if variant == "fla":
        modeling.lightning_attn = _fla_attention
    try:
        x = torch.randn(batch, tokens // batch, config.hidden_size, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True)
        positions = torch.arange(tokens // batch, device="cuda")
        grad = torch.randn_like(x)

        def step():
            out, _ = layer(x, positions=positions)
            out.backward(grad)

        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
        ms = do_bench(step, warmup=5, rep=50, grad_to_none=[x, *layer.parameters()], return_mode="median")
    finally:
        modeling.lightning_attn = original
    return dict(variant=variant, tokens=tokens, batch=batch, layer_idx=layer_idx, lrpe=bool(config.lrpe_layers[layer_idx]),
                fwd_bwd_ms=round(ms, 3), extra_peak_MiB=round(peak / 2**20))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 1], help="0 has LRPE (d_k = 2 d_v), 1 has not")
    parser.add_argument("--variants", nargs="+", default=["ours", "fla", "torch"], choices=("ours", "fla", "torch"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("layer.py needs a CUDA device")
    rows = []
    for tokens in args.tokens:
        for layer_idx in args.layers:
            for variant in args.variants:
                try:
                    row = time_layer(variant, tokens, layer_idx, args.batch)
                except Exception as error:  # a missing anchor (fla not installed) is recorded, not fatal
                    row = dict(variant=variant, tokens=tokens, layer_idx=layer_idx, error=repr(error)[:300])
                print(json.dumps(row), flush=True)
                rows.append(row)
    meta = dict(command=" ".join(["python", *sys.argv]), gpu=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"),
                versions={name: _version(name) for name in ("torch", "triton", "fla-core", "transnormer-hf")})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
