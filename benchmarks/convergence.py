"""Does it learn? TNL against a same-size Llama on real text, and the Triton path against the torch path.

    python benchmarks/convergence.py --out benchmarks/results/convergence_h200.json            # one GPU, ~11 min
    python benchmarks/convergence.py --shape tiny --device cpu --out /tmp/convergence_cpu.json  # CPU smoke, ~1 min
    python benchmarks/convergence.py --plot benchmarks/results/convergence_h200.json           # re-plot, any machine

Corpus (no download): the source code and documentation that ship with the running Python, its standard library
and its site-packages (`*.py`, `*.pyi`, `*.rst`, `*.md`, `*.txt` and the packages' METADATA, which holds their
README), exact duplicates dropped, files over 512 KB (generated tables) skipped (`--shape tiny` reads the
standard library only: listing site-packages takes seconds). Files are split into training
and held-out BY FILE (crc32 of the path inside its root, `--heldout-percent`), read in a seeded random order
until `--corpus-mb` of training text. The JSON states what was read and its size.

Tokenizer: byte-level BPE (`tokenizers`), trained on the first `--tokenizer-mb` of the training split only, by
`transnormer_hf.quickstart.train_tokenizer` (imported, not copied).

Part 1, learning: TNL and `same_size_llama` (LlamaForCausalLM, SDPA, parameter-matched) from the same seed, on
the same batches in the same order (training text cut into rows of `--context` tokens), AdamW (fused on CUDA),
the same warm-up + cosine schedule, the same token budget, bf16 autocast on CUDA (fp32 master weights). TNL runs
its default path (`attention_backend="auto"`: the Triton kernels on CUDA) with the chunked loss. The budget is
`--tokens`, or `--minutes-per-model` of the slower model, whose speed is measured on a few steps first (shortened
when needed so the whole run ends within `--deadline-minutes`, if given). Held-out
rows are the first `--context` tokens of held-out files at least that long, so a position in the row is a
position in a real document: the held-out loss is given overall and per position range (0-127, 128-511,
512-2047 at 2K context: does TNL use its long context as Llama does?). The JSON is rewritten after every
evaluation, so a run cut short keeps what it measured.

Part 2, Triton path against torch path: TNL from the same initial weights, on the same batches (the first
`--compare-steps` batches of part 1, `--compare-rows` rows each, their first `--compare-context` tokens), the
same optimizer, a short warm-up then the peak learning rate, trained three times:
  triton   the Triton path in the compute precision (bf16 autocast on CUDA; fp32 under TRITON_INTERPRET=1 on CPU),
  torch    the torch path in the same precision (the readable reference forms),
  truth    the torch path one precision up (fp32 with TF32 off on CUDA; float64 on CPU).
Bound (the house tolerance rule of style.md, applied to training curves): both bf16 runs round differently from
the truth; the Triton path passes when its loss deviates from the truth by at most twice what the torch path's
does, plus a floor `atol` (1e-3 nats in bf16, 1e-5 in fp32) for the first steps, where both deviations are the
rounding of one forward pass (the torch path's can be 1 ulp of the loss by luck; a 100M model's fp32 loss differs
by ~1e-5 between two summation orders) rather than of a diverging trajectory. Deviations of single steps can
cross zero by chance, so the rule compares running maxima: for every step t,
    max_{s<=t} |L_triton(s) - L_truth(s)| <= 2 max_{s<=t} |L_torch(s) - L_truth(s)| + atol.
The final weights obey the same rule: |W_triton - W_truth| <= 2 |W_torch - W_truth| (reported relative to the
truth's own update |W_truth - W_0|). The torch path is slow: its run stops after `--compare-seconds` and the
other two run the same number of steps. It is bound by the host (a Python loop over blocks of 64 tokens per
layer), so more rows per step cost it little: the default is 8.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch

from transnormer_hf import TransNormerLLMConfig, TransNormerLLMForCausalLM
from transnormer_hf.kernels import triton_unavailable_reason
from transnormer_hf.baselines import same_size_llama
from transnormer_hf.quickstart import token_blocks, train_tokenizer

ROOT_KEYS = ("stdlib", "purelib", "platlib")  # the standard library and site-packages
SHAPES = {
    # ~105M parameters with a 16K vocabulary (TNL and Llama within 0.1%); head width 128 as in the released sizes.
    "100M": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=6, intermediate_size=2048),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
}
# Defaults per shape: the GPU run (5 minutes of the slower model) takes about 11 minutes on one H200 in all; the
# tiny one a minute on 2 CPU cores.
DEFAULTS = {
    "100M": dict(context=2048, rows=32, vocab_size=16384, corpus_mb=128.0, tokenizer_mb=16.0, heldout_blocks=128,
                 minutes_per_model=5.0, lr=1e-3, heldout_percent=3.0, compare_steps=200, compare_rows=8,
                 compare_context=2048, compare_seconds=40.0, roots=list(ROOT_KEYS), deadline_minutes=0.0),
    # tiny reads the standard library only (listing site-packages takes seconds); the Triton interpreter allows
    # only a few steps of one short row.
    "tiny": dict(context=128, rows=8, vocab_size=1024, corpus_mb=1.5, tokenizer_mb=0.5, heldout_blocks=16,
                 minutes_per_model=0.1, lr=3e-3, heldout_percent=10.0, compare_steps=3, compare_rows=1,
                 compare_context=16, compare_seconds=30.0, roots=["stdlib"], deadline_minutes=0.0),
}
SUFFIXES = (".py", ".pyi", ".rst", ".md", ".txt")
MAX_FILE_BYTES = 512 * 1024
MODELS = ("tnl", "llama")
PATH_RUNS = ("triton", "torch", "truth")


# ---- corpus


def corpus_roots(keys: tuple[str, ...] = ROOT_KEYS) -> list[Path]:
    """The folders of the running Python named by `keys` (sysconfig: stdlib, purelib, platlib), each once."""
    paths = sysconfig.get_paths()
    roots = []
    for key in keys:
        root = Path(paths[key]).resolve()
        if root.is_dir() and root not in roots:
            roots.append(root)
    return roots


def _corpus_files(roots: list[Path]) -> list[tuple[Path, str]]:
    """(file, path relative to its root) of every candidate file, sorted; a root nested in another is read once."""
    files = {}
    for root in roots:
        for folder, subfolders, names in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if d != "__pycache__" and Path(folder, d).resolve() not in
                                   roots)
            for name in names:
                if name.endswith(SUFFIXES) or name == "METADATA":
                    path = Path(folder, name)
                    files.setdefault(path, path.relative_to(root).as_posix())
    return sorted(files.items())


def read_corpus(corpus_mb: float, heldout_percent: float, seed: int, root_keys: tuple[str, ...] = ROOT_KEYS) -> dict:
    """Training and held-out documents (one per file, split by file), read in a seeded order up to `corpus_mb`."""
    roots = corpus_roots(root_keys)
    files = _corpus_files(roots)
    random.Random(seed).shuffle(files)
    budget = int(corpus_mb * 1e6)
    split = {"train": [], "heldout": []}
    sizes = {"train": 0, "heldout": 0}
    seen, duplicates, skipped = set(), 0, 0
    for path, relative in files:
        if sizes["train"] >= budget:
            break
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                skipped += 1
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            skipped += 1
            continue
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if not text.strip() or digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        # The split depends on the path alone, so a file is on the same side whatever else is installed.
        side = "heldout" if zlib.crc32(relative.encode()) % 10_000 < heldout_percent * 100 else "train"
        split[side].append(text)
        sizes[side] += len(text)
    stats = dict(roots=[str(root) for root in roots], candidate_files=len(files),
                 train_files=len(split["train"]), heldout_files=len(split["heldout"]),
                 train_characters=sizes["train"], heldout_characters=sizes["heldout"],
                 duplicates_dropped=duplicates, unreadable_or_too_large=skipped,
                 suffixes=list(SUFFIXES) + ["METADATA"], heldout_percent=heldout_percent)
    if not split["train"] or not split["heldout"]:
        raise RuntimeError(f"the corpus under {stats['roots']} is too small to split: {stats}")
    return dict(split, stats=stats)


def heldout_rows(tokenizer, documents: list[str], context: int, limit: int) -> torch.Tensor:
    """(rows, context) int64: the first `context` tokens of each held-out document at least that long."""
    rows = [ids[:context] for ids in tokenizer(documents, add_special_tokens=False)["input_ids"] if len(ids) >= context]
    if len(rows) < 2:
        raise RuntimeError(f"only {len(rows)} held-out files have {context} tokens or more; raise --corpus-mb")
    return torch.tensor(rows[:limit], dtype=torch.int64)


def batch_order(num_rows: int, rows_per_step: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, rows_per_step) row indices: seeded permutations of the training rows, one per epoch, end to end."""
    generator = torch.Generator().manual_seed(seed)
    needed = steps * rows_per_step
    epochs = [torch.randperm(num_rows, generator=generator) for _ in range(math.ceil(needed / num_rows))]
    return torch.cat(epochs)[:needed].view(steps, rows_per_step)


# ---- models, precision, schedule


def build_model(name: str, args, tokenizer, backend: str = "auto",
                loss_chunk_size: int | None = None) -> torch.nn.Module:
    """A freshly initialised TNL or same-size Llama (seeded by --seed), fp32 weights on the run's device."""
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    config = TransNormerLLMConfig(**SHAPES[args.shape], vocab_size=len(tokenizer), attention_backend=backend,
                                  loss_chunk_size=args.loss_chunk_size if loss_chunk_size is None else loss_chunk_size,
                                  **special)
    torch.manual_seed(args.seed)
    model = TransNormerLLMForCausalLM(config) if name == "tnl" else same_size_llama(config)
    if name == "llama":
        model.config._attn_implementation = "sdpa"
    return model.to(args.device).train()


def autocast(device: str, enabled: bool = True):
    """bf16 autocast on CUDA (fp32 master weights); full precision elsewhere."""
    if device == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model: torch.nn.Module, args, total_steps: int, warmup: int, floor: float = 0.1):
    """AdamW (fused on CUDA; weight decay on matrices only) with linear warm-up then cosine to `floor` x peak
    (floor 1.0: constant after the warm-up)."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([dict(params=matrices, weight_decay=0.1), dict(params=others, weight_decay=0.0)],
                                  lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=args.device == "cuda")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_step(model, optimizer, scheduler, batch: torch.Tensor, micro_rows: int, device: str,
               use_autocast: bool = True) -> torch.Tensor:
    """One optimizer step on `batch` (rows, context) in micro-batches of `micro_rows`; returns the loss (a tensor,
    not synchronised)."""
    pieces = batch.split(micro_rows)
    total = torch.zeros((), dtype=torch.float64, device=device)  # float64: the truth's loss is not rounded
    for piece in pieces:
        piece = piece.to(device, non_blocking=True)
        with autocast(device, use_autocast):
            loss = model(input_ids=piece, labels=piece, use_cache=False).loss / len(pieces)
        loss.backward()
        total += loss.detach().double()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def synchronize(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


# ---- evaluation


@torch.no_grad()
def position_losses(model, rows: torch.Tensor, device: str, rows_per_forward: int) -> torch.Tensor:
    """(context - 1,) fp32: the loss of predicting token p + 1 from tokens 0..p, averaged over the held-out rows.

    The same code for both models: hidden states from `model.model`, the tied head, fp32 cross-entropy.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(rows.shape[1] - 1, device=device)
    for piece in rows.split(rows_per_forward):
        piece = piece.to(device)
        with autocast(device):
            hidden = model.model(input_ids=piece, use_cache=False).last_hidden_state[:, :-1]  # (R, N - 1, d)
            logits = model.lm_head(hidden).float()  # (R, N - 1, V)
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), piece[:, 1:], reduction="none")
        total += losses.sum(0)
    model.train(was_training)
    return (total / rows.shape[0]).cpu()


def position_ranges(context: int) -> list[tuple[int, int]]:
    """[0, c/16), [c/16, c/4), [c/4, c - 1): 0-127, 128-511, 512-2047 at 2K context."""
    return [(0, context // 16), (context // 16, context // 4), (context // 4, context - 1)]


def summarise_positions(losses: torch.Tensor, context: int) -> dict[str, float]:
    return {f"{begin}-{end if end == context - 1 else end - 1}": round(losses[begin:end].mean().item(), 4)
            for begin, end in position_ranges(context)}


def position_curve(losses: torch.Tensor, points: int = 40) -> list[tuple[int, float]]:
    """The per-position loss averaged over log-spaced bins: (first position of the bin, mean loss)."""
    edges = sorted({0, *(int(x) for x in torch.logspace(0, math.log10(len(losses)), points).tolist())})
    return [(begin, round(losses[begin:end].mean().item(), 4)) for begin, end in zip(edges, edges[1:]) if end > begin]


# ---- the record


class Record:
    """The whole result as one dict, rewritten to the JSON after every evaluation (plotting takes seconds: only
    after each part)."""

    def __init__(self, out: Path, meta: dict) -> None:
        self.out, self.data = out, dict(meta=meta, models={}, paths=None)
        out.parent.mkdir(parents=True, exist_ok=True)

    def write(self, with_plot: bool = False) -> None:
        self.out.write_text(json.dumps(self.data, indent=1))
        if with_plot:
            plot(self.data, self.out.with_suffix(".png"))
            if self.data["models"]:
                self.out.with_suffix(".md").write_text(markdown_summary(self.data))


# ---- part 1: learning


def measure_tokens_per_s(name: str, args, tokenizer, train: torch.Tensor, order: torch.Tensor) -> float:
    """Training tokens/s of a throw-away copy of the model on the first batches (3 warm-up steps, then 5 timed)."""
    model = build_model(name, args, tokenizer)
    optimizer, scheduler = make_optimizer(model, args, 100, 10)
    for step in range(8):
        if step == 3:
            start = synchronize(args.device)
        train_step(model, optimizer, scheduler, train[order[step % len(order)]], args.micro_rows, args.device)
    seconds = synchronize(args.device) - start
    del model, optimizer
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return 5 * order.shape[1] * args.context / seconds


def train_model(name: str, args, tokenizer, train: torch.Tensor, heldout: torch.Tensor, order: torch.Tensor,
                record: Record) -> dict:
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the speed probes ran before: their peaks are not this model's
    model = build_model(name, args, tokenizer)
    steps = order.shape[0]
    optimizer, scheduler = make_optimizer(model, args, steps, warmup=max(1, steps // 20))
    tokens_per_step = order.shape[1] * args.context
    result = dict(parameters=sum(p.numel() for p in model.parameters()), steps_done=0, tokens=0, train_seconds=0.0,
                  tokens_per_s=None, evals=[], train_loss=[])
    if name == "tnl":
        from transnormer_hf.kernels import resolve_backend

        result["attention_backend"] = resolve_backend("auto", torch.device(args.device))
    else:
        result["attention_implementation"] = model.config._attn_implementation
    record.data["models"][name] = result
    eval_steps = sorted({0, steps, *range(args.eval_every, steps, args.eval_every)})
    print(f"{name}: {result['parameters'] / 1e6:.3g}M parameters, {steps} steps of {tokens_per_step:,} tokens")
    step, pending = 0, []
    for target in eval_steps:
        start = synchronize(args.device)
        while step < target:
            pending.append(train_step(model, optimizer, scheduler, train[order[step]], args.micro_rows, args.device))
            step += 1
        result["train_seconds"] += synchronize(args.device) - start
        result["train_loss"] += [round(x, 4) for x in torch.stack(pending).tolist()] if pending else []
        pending = []
        losses = position_losses(model, heldout, args.device, args.eval_rows)
        result.update(steps_done=step, tokens=step * tokens_per_step)
        if step:
            result["tokens_per_s"] = round(result["tokens"] / result["train_seconds"])
        result["evals"].append(dict(step=step, tokens=step * tokens_per_step,
                                    heldout_loss=round(losses.mean().item(), 4),
                                    by_position=summarise_positions(losses, args.context)))
        result["final_position_curve"] = position_curve(losses)
        print(f"  {name} step {step:>5}: held-out {result['evals'][-1]['heldout_loss']:.4f} "
              f"{result['evals'][-1]['by_position']} ({result['tokens_per_s'] or 0:,} tok/s)", flush=True)
        record.write()
    if args.device == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    record.write(with_plot=True)
    del model, optimizer
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


# ---- part 2: Triton path against torch path


def _path_run(kind: str, args, tokenizer, initial: dict, batches: torch.Tensor, deadline: float | None):
    """Train TNL `kind` (triton | torch | truth) from `initial` on `batches`; stops early past `deadline`."""
    backend = "triton" if kind == "triton" else "torch"
    # Always the library's chunked loss here: it keeps the truth's dtype (transformers' loss casts logits to fp32)
    # and is part of what the Triton path replaces (a Triton kernel per chunk of rows).
    model = build_model("tnl", args, tokenizer, backend=backend, loss_chunk_size=args.loss_chunk_size or 4096)
    model.load_state_dict(initial)
    truth = kind == "truth"
    if truth and args.device == "cpu":
        model.double()
    # The same schedule however many steps the run gets: warm-up from --compare-steps, then constant.
    warmup = max(1, min(10, args.compare_steps // 4))
    optimizer, scheduler = make_optimizer(model, args, args.compare_steps, warmup, floor=1.0)
    losses, start = [], time.perf_counter()
    for batch in batches:
        loss = train_step(model, optimizer, scheduler, batch, args.micro_rows, args.device, use_autocast=not truth)
        losses.append(loss.item())
        if deadline is not None and time.perf_counter() - start > deadline:
            break
    seconds = time.perf_counter() - start
    weights = {key: value.detach().double().cpu() for key, value in model.state_dict().items()}
    del model, optimizer
    return losses, weights, seconds


def compare_paths(args, tokenizer, train: torch.Tensor, order: torch.Tensor, record: Record) -> None:
    reason = triton_unavailable_reason(torch.device(args.device))
    precision = "bf16 autocast" if args.device == "cuda" else "fp32"
    truth_precision = "fp32, TF32 off" if args.device == "cuda" else "float64"
    result = dict(precision=precision, truth_precision=truth_precision, rows=args.compare_rows,
                  context=min(args.compare_context, args.context),
                  rule="max_{s<=t}|triton-truth| <= 2 max_{s<=t}|torch-truth| + atol, for every step t; "
                       "|W_triton - W_truth| <= 2 |W_torch - W_truth| at the end")
    record.data["paths"] = result
    if reason is not None:
        result["skipped"] = f"the Triton path cannot run here: {reason}"
        print(f"Triton against torch: skipped ({result['skipped']})")
        record.write()
        return
    torch.backends.cuda.matmul.allow_tf32 = False  # the truth is real fp32 (the default; said here, not assumed)
    initial = {key: value.clone() for key, value in build_model("tnl", args, tokenizer).state_dict().items()}
    batches = train[order[: args.compare_steps, : args.compare_rows], : args.compare_context]
    torch_losses, torch_weights, torch_seconds = _path_run("torch", args, tokenizer, initial, batches,
                                                           args.compare_seconds)
    steps = len(torch_losses)
    batches = batches[:steps]
    print(f"Triton against torch: the torch path ran {steps} steps in {torch_seconds:.0f} s")
    truth_losses, truth_weights, _ = _path_run("truth", args, tokenizer, initial, batches, None)
    triton_losses, triton_weights, triton_seconds = _path_run("triton", args, tokenizer, initial, batches, None)
    atol = 1e-3 if args.device == "cuda" else 1e-5
    triton_dev = [abs(a - b) for a, b in zip(triton_losses, truth_losses)]
    torch_dev = [abs(a - b) for a, b in zip(torch_losses, truth_losses)]
    envelope_triton = [max(triton_dev[: t + 1]) for t in range(steps)]
    envelope_torch = [max(torch_dev[: t + 1]) for t in range(steps)]
    violations = [t for t in range(steps) if envelope_triton[t] > 2 * envelope_torch[t] + atol]
    update = math.sqrt(sum(((truth_weights[k] - initial[k].double().cpu()) ** 2).sum().item() for k in initial))

    def weight_distance(weights: dict) -> float:
        return math.sqrt(sum(((weights[k] - truth_weights[k]) ** 2).sum().item() for k in initial)) / update

    distances = dict(triton=weight_distance(triton_weights), torch=weight_distance(torch_weights))
    result.update(steps=steps, atol=atol, loss=dict(triton=triton_losses, torch=torch_losses, truth=truth_losses),
                  max_deviation=dict(triton=max(triton_dev), torch=max(torch_dev)),
                  weight_distance_from_truth=distances,
                  seconds=dict(torch=round(torch_seconds, 1), triton=round(triton_seconds, 1)),
                  violations=violations, passed=not violations and distances["triton"] <= 2 * distances["torch"])
    print(f"  max |loss - truth| over {steps} steps: Triton {max(triton_dev):.2e}, torch {max(torch_dev):.2e}; "
          f"weights' distance from the truth / its update: Triton {result['weight_distance_from_truth']['triton']:.2e},"
          f" torch {result['weight_distance_from_truth']['torch']:.2e}; "
          f"{'within' if result['passed'] else 'OUTSIDE'} the bound")
    record.write(with_plot=True)


# ---- plot


def plot(data: dict, path: Path) -> None:
    """Four panels: held-out loss against tokens, loss by position, and the Triton/torch/truth loss curves with their
    deviations from the truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ((curve, position), (paths, deviation)) = plt.subplots(2, 2, figsize=(11, 7.5))
    labels = dict(tnl="TNL", llama="Llama (SDPA)")
    for name, result in data["models"].items():
        evals = result["evals"]
        curve.plot([e["tokens"] / 1e6 for e in evals], [e["heldout_loss"] for e in evals], "o-", ms=3,
                   label=f"{labels[name]} ({result['parameters'] / 1e6:.3g}M, {result['tokens_per_s'] or 0:,} tok/s)")
        if "final_position_curve" in result:
            position.plot(*zip(*[(p + 1, loss) for p, loss in result["final_position_curve"]]), label=labels[name])
    curve.set(xlabel="training tokens (millions)", ylabel="held-out loss (nats / token)", title="held-out loss")
    position.set(xscale="log", xlabel="position in the context (tokens seen + 1)", ylabel="held-out loss",
                 title="held-out loss by position, end of training")
    compare = data.get("paths") or {}
    if "loss" in compare:
        steps = range(1, compare["steps"] + 1)
        for kind, style in (("truth", "k-"), ("torch", "C1--"), ("triton", "C0:")):
            paths.plot(steps, compare["loss"][kind], style, label=kind)
            if kind != "truth":
                deviation.plot(steps, [max(abs(a - b), 1e-9) for a, b in zip(compare["loss"][kind],
                                                                            compare["loss"]["truth"])], style,
                               label=f"|{kind} - truth|")
        deviation.set(yscale="log")
    else:
        paths.text(0.5, 0.5, compare.get("skipped", "not run yet"), ha="center", va="center", wrap=True,
                   transform=paths.transAxes)
    paths.set(xlabel="step", ylabel="training loss", title=f"TNL: Triton vs torch path ({compare.get('precision')})")
    deviation.set(xlabel="step", ylabel="|loss - truth| (nats)",
                  title=f"deviation from the truth ({compare.get('truth_precision')})")
    for axes in (curve, position, paths, deviation):
        axes.grid(alpha=0.3, which="both")
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    figure.suptitle(f"Does it learn? {data['meta'].get('device', '')}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def markdown_summary(data: dict) -> str:
    """The README's table and sentences, from a result: what `<out>.md` holds, ready to paste."""
    meta, models, paths = data["meta"], data["models"], data.get("paths") or {}
    settings = meta["settings"]
    names = [name for name in MODELS if name in models]
    labels = dict(tnl="TNL", llama="Llama (SDPA)")
    last = {name: models[name]["evals"][-1] for name in names}
    ranges = list(last[names[0]]["by_position"])
    lines = [f"| {meta['device']}, {meta['date']} | " + " | ".join(labels[n] for n in names) + " |",
             "|---|" + "---|" * len(names),
             "| parameters | " + " | ".join(f"{models[n]['parameters'] / 1e6:.4g}M" for n in names) + " |",
             f"| held-out loss after {last[names[0]]['tokens'] / 1e6:.1f}M tokens (nats/token) | "
             + " | ".join(f"{last[n]['heldout_loss']:.3f}" for n in names) + " |"]
    lines += [f"| held-out loss, positions {r} | " + " | ".join(f"{last[n]['by_position'][r]:.3f}" for n in names)
              + " |" for r in ranges]
    lines.append(f"| training tokens/s ({settings['precision']}) | "
                 + " | ".join(f"{(models[n]['tokens_per_s'] or 0) / 1e3:.0f}K" for n in names) + " |")
    corpus = meta["corpus"]
    text = ["\n".join(lines),
            f"{settings['steps']} steps of {settings['rows']} x {settings['context']} tokens "
            f"({settings['epochs']} epochs of {corpus['train_tokens'] / 1e6:.1f}M training tokens from "
            f"{corpus['train_files']:,} files; {corpus['heldout_rows']} held-out rows from other files; "
            f"{corpus['vocab_size']:,}-token BPE), `{meta['command']}`, torch {meta['versions']['torch']}, "
            f"Triton {meta['versions']['triton']}, transformers {meta['versions']['transformers']}."]
    if "tnl" in last and "llama" in last:
        gap = last["tnl"]["heldout_loss"] - last["llama"]["heldout_loss"]
        text.append(f"TNL - Llama at equal tokens: {gap:+.3f} nats/token overall; "
                    + ", ".join(f"{last['tnl']['by_position'][r] - last['llama']['by_position'][r]:+.3f} at "
                                f"positions {r}" for r in ranges) + ".")
    if "loss" in paths:
        distance = paths["weight_distance_from_truth"]
        text.append(
            f"Triton path against torch path (TNL, same initial weights and batches, {paths['steps']} steps of "
            f"{paths['rows']} x {paths['context']} tokens, {paths['precision']}; truth: the torch path in "
            f"{paths['truth_precision']}): largest deviation of the loss from the truth "
            f"{paths['max_deviation']['triton']:.2e} (Triton) and {paths['max_deviation']['torch']:.2e} nats (torch); "
            f"final weights' distance from the "
            f"truth's, relative to its update, {distance['triton']:.2e} and {distance['torch']:.2e}: "
            + ("within the bound (at most 2x the torch path's, plus "
               f"{paths['atol']} nats)." if paths["passed"] else "OUTSIDE the bound (2x the torch path's, plus "
               f"{paths['atol']} nats): loss at steps {paths['violations'][:10] or 'none'}, weights "
               f"{'outside' if distance['triton'] > 2 * distance['torch'] else 'within'}."))
    elif "skipped" in paths:
        text.append(f"Triton path against torch path: skipped ({paths['skipped']}).")
    return "\n\n".join(text) + "\n"


# ---- the command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/convergence.json"))
    parser.add_argument("--plot", type=Path, default=None, metavar="JSON",
                        help="only redo the plot (.png) and the README table (.md) of a result file")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="100M")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--context", type=int, help="tokens per row")
    parser.add_argument("--rows", type=int, help="rows per optimizer step")
    parser.add_argument("--micro-rows", type=int, help="rows per forward/backward (gradient accumulation)")
    parser.add_argument("--vocab-size", type=int, help="BPE vocabulary")
    parser.add_argument("--corpus-mb", type=float, help="training text to read, in millions of characters")
    parser.add_argument("--tokenizer-mb", type=float, help="training text the tokenizer learns from")
    parser.add_argument("--roots", nargs="+", choices=ROOT_KEYS, help="where to read (sysconfig path names)")
    parser.add_argument("--heldout-percent", type=float, help="share of files held out (by path)")
    parser.add_argument("--heldout-blocks", type=int, help="held-out rows (files at least --context tokens long)")
    parser.add_argument("--tokens", type=int, default=None, help="token budget per model (default: from the time)")
    parser.add_argument("--minutes-per-model", type=float, help="the budget: this many minutes of the slower model")
    parser.add_argument("--deadline-minutes", type=float, help="shorten --minutes-per-model so the whole run ends "
                        "within this many minutes of its start (0: no deadline)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: ~12 in all)")
    parser.add_argument("--eval-rows", type=int, default=8, help="held-out rows per evaluation forward")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--loss-chunk-size", type=int, default=None, help="TNL's chunked loss (0: off; default "
                        "4096 on CUDA, 0 on CPU)")
    parser.add_argument("--compare-steps", type=int, help="at most this many steps of the Triton/torch comparison")
    parser.add_argument("--compare-rows", type=int, help="rows per step of the comparison")
    parser.add_argument("--compare-context", type=int, help="the first this many tokens of each row in the comparison")
    parser.add_argument("--compare-seconds", type=float, help="stop the torch path's run after this long")
    parser.add_argument("--parts", nargs="+", choices=("learn", "paths"), default=["learn", "paths"])
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.micro_rows is None:
        args.micro_rows = args.rows
    if args.loss_chunk_size is None:
        args.loss_chunk_size = 4096 if args.device == "cuda" else 0
    for name in ("context", "rows", "micro_rows", "vocab_size", "heldout_blocks", "eval_rows", "compare_steps",
                 "compare_rows", "compare_context"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if args.rows % args.micro_rows:
        parser.error(f"--rows ({args.rows}) must be a multiple of --micro-rows ({args.micro_rows})")
    if args.tokens is not None and args.tokens < args.rows * args.context:
        parser.error(f"--tokens must be at least one step ({args.rows * args.context}); got {args.tokens}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot is not None:
        data = json.loads(args.plot.read_text())
        plot(data, args.plot.with_suffix(".png"))
        args.plot.with_suffix(".md").write_text(markdown_summary(data))
        print(f"plot: {args.plot.with_suffix('.png')}; README table: {args.plot.with_suffix('.md')}")
        return 0
    import transformers

    wall = time.perf_counter()
    corpus = read_corpus(args.corpus_mb, args.heldout_percent, args.seed, tuple(args.roots))
    stats = corpus["stats"]
    print(f"corpus: {stats['train_files']:,} training files ({stats['train_characters'] / 1e6:.1f}M characters), "
          f"{stats['heldout_files']:,} held-out files ({stats['heldout_characters'] / 1e6:.2f}M) from {stats['roots']}")
    sample, size = [], 0
    for text in corpus["train"]:  # the tokenizer learns from the training split only
        sample.append(text)
        size += len(text)
        if size >= args.tokenizer_mb * 1e6:
            break
    start = time.perf_counter()
    tokenizer = train_tokenizer(sample, args.vocab_size)
    tokenizer_seconds = time.perf_counter() - start
    start = time.perf_counter()
    train = token_blocks(tokenizer, corpus["train"], args.context)
    heldout = heldout_rows(tokenizer, corpus["heldout"], args.context, args.heldout_blocks)
    stats.update(tokenizer="byte-level BPE (tokenizers), transnormer_hf.quickstart.train_tokenizer",
                 vocab_size=len(tokenizer), tokenizer_characters=size, tokenizer_seconds=round(tokenizer_seconds, 1),
                 tokenize_seconds=round(time.perf_counter() - start, 1), train_tokens=train.numel(),
                 train_rows=train.shape[0], heldout_rows=heldout.shape[0],
                 characters_per_token=round(stats["train_characters"] / train.numel(), 2))
    print(f"tokenizer: {len(tokenizer):,} tokens, trained on {size / 1e6:.1f}M characters in "
          f"{tokenizer_seconds:.0f} s; "
          f"{train.numel() / 1e6:.1f}M training tokens ({train.shape[0]:,} rows of {args.context}), "
          f"{heldout.shape[0]} held-out rows")

    if args.device == "cuda":
        train = train.to(args.device)  # a few hundred MB: no host-to-device copy per step
    tokens_per_step = args.rows * args.context
    probe_order = batch_order(train.shape[0], args.rows, 8, args.seed)
    speeds = {}
    if args.tokens is None and "learn" in args.parts:
        speeds = {name: round(measure_tokens_per_s(name, args, tokenizer, train, probe_order)) for name in MODELS}
        minutes = args.minutes_per_model
        if args.deadline_minutes:
            # What is left of the deadline after start-up, the comparison (its torch and truth runs take about
            # --compare-seconds each, the Triton run far less) and ~13 evaluations per model, for two models.
            left = args.deadline_minutes * 60 - (time.perf_counter() - wall)
            left -= ("paths" in args.parts) * (2.5 * args.compare_seconds + 20) + 30
            minutes = max(0.05, min(minutes, left / 2 / 60))
        budget = int(minutes * 60 * min(speeds.values()))
        print(f"measured {speeds} tokens/s: {minutes:.2f} minutes of the slower one is {budget:,} tokens")
    else:
        budget = args.tokens or tokens_per_step
    steps = max(1, budget // tokens_per_step)
    order = batch_order(train.shape[0], args.rows, max(steps, args.compare_steps), args.seed)
    if args.eval_every is None:
        args.eval_every = max(1, round(steps / 12))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    meta = dict(command="python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
                date=time.strftime("%Y-%m-%d"), device=device_name,
                versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                              python=platform.python_version(),
                              triton=getattr(sys.modules.get("triton"), "__version__", None)),
                corpus=stats, shape=dict(name=args.shape, **SHAPES[args.shape]),
                settings=dict(context=args.context, rows=args.rows, micro_rows=args.micro_rows, steps=steps,
                              tokens_per_model=steps * tokens_per_step,
                              epochs=round(steps * args.rows / train.shape[0], 2),
                              lr=args.lr, schedule="linear warm-up (5% of steps), cosine to 10%", betas=[0.9, 0.95],
                              weight_decay="0.1 on matrices", grad_clip=1.0, seed=args.seed,
                              precision="bf16 autocast, fp32 weights" if args.device == "cuda" else "fp32",
                              tnl_loss_chunk_size=args.loss_chunk_size, eval_every=args.eval_every,
                              measured_tokens_per_s=speeds, minutes_per_model=args.minutes_per_model,
                              deadline_minutes=args.deadline_minutes))
    record = Record(args.out, meta)
    if "learn" in args.parts:
        for name in MODELS:
            train_model(name, args, tokenizer, train, heldout, order[:steps], record)
        tnl, llama = (record.data["models"][name]["evals"][-1] for name in MODELS)
        record.data["summary"] = dict(heldout_loss=dict(tnl=tnl["heldout_loss"], llama=llama["heldout_loss"]),
                                      tnl_minus_llama=round(tnl["heldout_loss"] - llama["heldout_loss"], 4))
    if "paths" in args.parts:
        compare_paths(args, tokenizer, train, order, record)
    meta["wall_seconds"] = round(time.perf_counter() - wall)
    record.write(with_plot=True)
    print(markdown_summary(record.data) if record.data["models"] else "")
    print(f"done in {meta['wall_seconds']} s: {args.out}, {args.out.with_suffix('.png')}, "
          f"{args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
