"""Fixture parity of the whole model on CUDA: every tnl_tiny_a reference, per backend and dtype.

CI has no GPU, so this script is how the CUDA claims of the core issue are checked. It prints one line per
(backend, dtype, reference) with the relative RMS error against the official fp32 outputs, writes them as
JSON, and exits non-zero when an fp32 error exceeds 1e-5 (torch) or the Triton fp32 bound below.

    python benchmarks/gpu_checks.py --out benchmarks/results/gpu_checks.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from transnormer_hf import TransNormerLLMForCausalLM
from transnormer_hf.modeling_transnormer import CACHE_FIELD

# fp32 Triton kernels accumulate in fp32 but may use TF32 tensor-core products; bf16/fp16 are reported only.
FP32_BOUNDS = {"torch": 1e-5, "triton": 1e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def check(model: TransNormerLLMForCausalLM, ref: dict[str, torch.Tensor], device: str) -> dict[str, float]:
    """Relative errors of every reference the fixture holds."""
    ids = ref["train.input_ids"].to(device)
    errors = {}
    with torch.no_grad():
        model.train()
        out = model(ids, output_hidden_states=True)
        errors["train.logits"] = rel_err(out.logits, ref["train.logits"])
        for index, hidden in enumerate(out.hidden_states):
            errors[f"train.hidden_states.{index}"] = rel_err(hidden, ref[f"train.hidden_states.{index}"])
        model.eval()
        errors["eval.logits"] = rel_err(model(ids, use_cache=False).logits, ref["eval.logits"])
        cache, steps = None, []
        for t in range(ids.shape[1]):
            step = model(ids[:, t:t + 1], use_cache=True, **{CACHE_FIELD: cache})
            cache = getattr(step, CACHE_FIELD)
            steps.append(step.logits)
        errors["decode.logits"] = rel_err(torch.cat(steps, dim=1), ref["decode.logits"])
        out = model(ref["long.input_ids"].to(device), use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        errors["long.logits"] = rel_err(out.logits, ref["long.logits"])
        for layer in range(model.config.num_hidden_layers):
            errors[f"long.state.{layer}"] = rel_err(cache[layer], ref[f"long.state.{layer}"])
        following = model(ref["long.next_input_ids"].to(device), use_cache=True, **{CACHE_FIELD: cache})
        errors["long.next_logits"] = rel_err(following.logits, ref["long.next_logits"])
        mask = ref["pad.attention_mask"].to(device)
        logits = model(ref["pad.input_ids"].to(device), attention_mask=mask, use_cache=False).logits
        errors["pad.logits"] = rel_err(logits[mask.bool()], ref["pad.logits"][mask.cpu().bool()])
    for case in ("greedy", "greedy_pad"):
        prompt = ref[f"{case}.input_ids"].to(device)
        mask = ref.get(f"{case}.attention_mask", torch.ones_like(ref[f"{case}.input_ids"])).to(device)
        sequences = model.generate(prompt, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None)
        errors[f"{case}.sequences_differ"] = float(not torch.equal(sequences.cpu(), ref[f"{case}.sequences"]))
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tnl_tiny_a",
                        help="the tnl_tiny_a folder (default: the copy in tests/fixtures)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_checks.py needs a CUDA device")
    ref = load_file(str(args.fixture / "reference.safetensors"))
    results, failures = [], []
    for backend in ("torch", "triton"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            model = TransNormerLLMForCausalLM.from_pretrained(
                args.fixture / "hf", dtype=dtype, attention_backend=backend
            ).to("cuda")
            started = time.perf_counter()
            errors = check(model, ref, "cuda")
            row = dict(backend=backend, dtype=str(dtype).removeprefix("torch."), errors=errors,
                       seconds=round(time.perf_counter() - started, 2))
            results.append(row)
            worst = max(value for key, value in errors.items() if not key.endswith("_differ"))
            print(f"{backend:6s} {row['dtype']:8s} worst rel err {worst:.2e}  "
                  f"greedy equal: {not errors['greedy.sequences_differ']}, "
                  f"padded greedy equal: {not errors['greedy_pad.sequences_differ']}")
            if dtype == torch.float32 and (worst > FP32_BOUNDS[backend] or errors["greedy.sequences_differ"]):
                failures.append(f"{backend} fp32: worst {worst:.2e}")
    meta = dict(command=" ".join([Path(sys.executable).name, *sys.argv]), gpu=torch.cuda.get_device_name(),
                torch=torch.__version__, python=platform.python_version(), date=time.strftime("%Y-%m-%d"))
    try:
        import transformers
        import triton

        meta.update(transformers=transformers.__version__, triton=triton.__version__)
    except ImportError:
        pass
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, results=results, failures=failures), indent=1))
    print("\n".join(failures) or "all fp32 checks within bounds")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
