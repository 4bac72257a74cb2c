"""LoRA fine-tuning throughput and peak memory: TNL (Triton or torch path) against a same-size Llama with SDPA.

One training step = forward + backward + AdamW step on the LoRA adapters (r 16 on every linear but the head),
bf16 autocast over fp32 base weights, gradient checkpointing, one packed row of `--lengths` tokens.
Writes a JSON with the command, GPU, versions and date.

    python benchmarks/train_lora.py --lengths 2048 8192 32768 --out benchmarks/results/train_lora.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone

import torch


def build(kind: str, preset: str, vocab_size: int) -> torch.nn.Module:
    """'tnl-triton' | 'tnl-torch' | 'llama-sdpa' at the size of the TNL preset, on the GPU, fp32 weights."""
    from transnormer_hf import TransNormerLLMConfig, TransNormerLLMForCausalLM

    if preset == "tiny":
        tnl = TransNormerLLMConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=128)
    else:
        tnl = TransNormerLLMConfig.from_preset(preset, vocab_size=vocab_size)
    if kind.startswith("tnl"):
        tnl.attention_backend = kind.split("-")[1]
        return TransNormerLLMForCausalLM(tnl)
    from transnormer_hf.baselines import same_size_llama

    llama = same_size_llama(tnl)  # same width, depth, heads and vocabulary; MLP widened to match the parameter count
    llama.config._attn_implementation = "sdpa"
    return llama


def measure(kind: str, preset: str, length: int, steps: int, vocab_size: int, device: str) -> dict:
    from peft import LoraConfig, get_peft_model

    model = build(kind, preset, vocab_size).to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, vocab_size, (1, length), device=device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step() -> float:
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    try:
        step()  # warm-up: Triton autotune, cuBLAS heuristics
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(steps):
            loss = step()
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        return {"model": kind, "length": length, "tokens_per_s": steps * length / elapsed,
                "peak_memory_gib": peak, "final_loss": loss}
    except torch.OutOfMemoryError:
        return {"model": kind, "length": length, "tokens_per_s": None, "peak_memory_gib": None, "error": "out of memory"}
    finally:
        del model, optimizer
        if device == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="385M", help="TNL size (tiny for a CPU smoke run)")
    parser.add_argument("--models", nargs="+", default=["tnl-triton", "tnl-torch", "llama-sdpa"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 8192, 32768])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--vocab-size", type=int, default=64000)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import peft
    import transformers

    record = {
        "command": " ".join([sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "python": platform.python_version()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "setup": "Llama: baselines.same_size_llama (parameter-matched, SDPA); LoRA r16 all-linear, bf16 autocast, "
                 "gradient checkpointing, batch 1, AdamW; warm-up step excluded",
        "results": [],
    }
    for length in args.lengths:
        for kind in args.models:
            row = measure(kind, args.preset, length, args.steps, args.vocab_size, device)
            record["results"].append(row)
            print(json.dumps(row), flush=True)
            if args.out:  # after every row, so a run cut short keeps what it measured
                with open(args.out, "w") as handle:
                    json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
