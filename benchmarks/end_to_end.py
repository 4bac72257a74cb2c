"""Whole-model training and decoding throughput: TNL against a same-size Llama, side by side in one run.

    python benchmarks/end_to_end.py train  --shape 1B --contexts 2048 8192 32768 --out train.json
    python benchmarks/end_to_end.py decode --shape 1B --contexts 1024 65536 --batches 1 8 64 --out decode.json

Training: bf16 weights, AdamW (fused), a fixed number of tokens per step split into batch = tokens/context
rows, random ids; reports tokens/s (median of the timed steps) and peak memory (LoRA fine-tuning has its own
script, train_lora.py). Decoding: the quickstart's
measurement at each batch size (a cache as it stands after `context` tokens, built without a prefill: TNL's
states from one step, Llama's keys and values random; the median of `--steps` single-token forwards after one
warm-up); reports ms per token, tokens/s for the batch and the cache's bytes. Out-of-memory is recorded as such, not raised.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from transnormer_hf import TransNormerLLMConfig, TransNormerLLMForCausalLM
from transnormer_hf.quickstart import decode_step_seconds


def build(model: str, shape: str, backend: str, vocab_size: int) -> torch.nn.Module:
    """A randomly initialised bf16 model on CUDA: TNL of a released shape, or Llama of the same widths."""
    tnl = TransNormerLLMConfig.from_preset(shape, vocab_size=vocab_size, attention_backend=backend)
    if model == "tnl":
        return TransNormerLLMForCausalLM(tnl).to("cuda", torch.bfloat16)
    llama = LlamaConfig(vocab_size=vocab_size, hidden_size=tnl.hidden_size, num_hidden_layers=tnl.num_hidden_layers,
                        num_attention_heads=tnl.num_attention_heads, intermediate_size=tnl.intermediate_size,
                        max_position_embeddings=1 << 17, tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(llama).to("cuda", torch.bfloat16)


def _synchronized() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def _attempt(measure, **row) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        row.update(measure())
    except torch.OutOfMemoryError:
        row["result"] = "out of memory"
    row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(row), flush=True)
    return row


def train_rows(args) -> list[dict]:
    rows = []
    for name in args.models:
        model = build(name, args.shape, args.backend, args.vocab_size)
        params = sum(p.numel() for p in model.parameters())
        if name in args.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        for context in args.contexts:
            batch = max(1, args.tokens_per_step // context)

            def measure() -> dict:
                times = []
                for step in range(args.warmup + args.steps):
                    ids = torch.randint(3, args.vocab_size, (batch, context), device="cuda")
                    start = _synchronized()
                    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if step >= args.warmup:
                        times.append(_synchronized() - start)
                seconds = statistics.median(times)
                return dict(result="ok", step_s=round(seconds, 4), tokens_per_s=round(batch * context / seconds))

            rows.append(_attempt(measure, mode="train", model=name, params=params, context=context, batch=batch,
                                 checkpointing=name in args.checkpointing, backend=args.backend))
        del model, optimizer
    return rows


@torch.no_grad()
def decode_rows(args) -> list[dict]:
    rows = []
    for name in args.models:
        model = build(name, args.shape, args.backend, args.vocab_size).eval()
        for batch in args.batches:
            for context in args.contexts:

                def measure() -> dict:
                    seconds, cache_bytes = decode_step_seconds(model, context, args.steps, "cuda", batch)
                    return dict(result="ok", ms_per_token=round(1000 * seconds, 3),
                                tokens_per_s=round(batch / seconds, 1), cache_gib=round(cache_bytes / 2**30, 3))

                rows.append(_attempt(measure, mode="decode", model=name, context=context, batch=batch,
                                     backend=args.backend))
        del model
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("train", "decode"))
    parser.add_argument("--shape", default="1B", choices=("385M", "1B", "7B"))
    parser.add_argument("--models", nargs="+", default=["tnl", "llama"], choices=("tnl", "llama"))
    parser.add_argument("--contexts", nargs="+", type=int, default=[2048, 8192, 32768])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64], help="decode batch sizes")
    parser.add_argument("--tokens-per-step", type=int, default=32768)
    parser.add_argument("--checkpointing", nargs="*", default=["llama"], help="models trained with checkpointing")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"), help="TNL's attention")
    parser.add_argument("--vocab-size", type=int, default=64000)
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("end_to_end.py needs a CUDA device")
    rows = train_rows(args) if args.mode == "train" else decode_rows(args)
    import transformers

    meta = dict(command=" ".join(["python", *sys.argv]), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                transformers=transformers.__version__, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
