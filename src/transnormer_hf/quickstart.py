"""`transnormer-hf quickstart`: the library's main job in one command, on text every Python install has.

Trains a byte-level BPE tokenizer and a few-million-parameter TNL from scratch on the docstrings of a fixed
list of standard-library modules (read from their source files, never imported), saves model, tokenizer
and generation config in the standard format, reloads them through the Auto* classes and checks the
logits are identical, samples, and times one decode step at growing context lengths next to a same-size
`LlamaForCausalLM` with its KV cache. Writes two PNGs and a JSON summary into the output folder.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .cli_common import CLIError, resolve_device, silence_known_warnings

# Modules whose docstrings form the corpus: long English prose with code examples, present in the
# standard library of every Python from 3.10 on (none of the modules removed by PEP 594).
CORPUS_MODULES = (
    "_collections_abc", "_pydecimal", "_pyio", "argparse", "ast", "base64", "bdb", "bisect", "bz2",
    "calendar", "cmd", "code", "codecs", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "difflib", "dis", "doctest", "enum", "fileinput", "fractions", "ftplib", "functools",
    "getopt", "gettext", "gzip", "heapq", "hmac", "imaplib", "inspect", "ipaddress", "locale", "logging",
    "lzma", "mailbox", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle",
    "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint", "pydoc", "queue", "random",
    "shelve", "shlex", "shutil", "site", "smtplib", "socket", "socketserver", "ssl", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "traceback", "turtle", "typing", "unittest", "urllib", "uuid", "wave", "weakref", "zipfile",
)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: the config's pad, bos and eos defaults
DEFAULT_CONTEXTS = (256, 512, 1024, 2048, 4096, 8192)
SAMPLE_PROMPTS = ("Return the", "The default value of", "This module provides")


@dataclass(frozen=True)
class QuickstartSetup:
    """Sizes and optimisation settings of the quickstart run (the defaults fit 3 minutes on 2 CPU cores)."""

    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    sequence_length: int = 128
    batch_size: int = 16
    learning_rate: float = 3e-3
    heldout_blocks: int = 16
    sample_new_tokens: int = 40
    decode_steps: int = 8


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `quickstart` subcommand."""
    parser = subparsers.add_parser(
        "quickstart",
        help="train a small TNL from scratch on an embedded corpus, save, reload, generate, plot decode cost",
        description=(
            "Train a byte-level BPE tokenizer and a small TransNormerLLM from scratch on the docstrings of "
            "the Python standard library (no download), save them as safetensors, reload them with "
            "AutoModelForCausalLM/AutoTokenizer, print samples, and compare the per-token decode time and "
            "cache memory of TNL with a same-size Llama at growing context lengths. Ctrl-C during training "
            "stops early and still saves a usable model."
        ),
    )
    parser.add_argument("--out", default="tnl-quickstart", metavar="DIR",
                        help="output folder for model, tokenizer, plots and summary (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=150, metavar="N",
                        help="optimizer steps of %d sequences x %d tokens (default: %%(default)s)"
                        % (QuickstartSetup.batch_size, QuickstartSetup.sequence_length))
    parser.add_argument("--device", default="auto", metavar="{auto,cpu,cuda}",
                        help="where to train and decode; auto picks cuda when available (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: %(default)s)")
    parser.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)), metavar="L1,L2,...",
                        help="context lengths of the decode-cost comparison (default: %(default)s)")
    parser.set_defaults(handler=_run_from_args)


def _run_from_args(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise CLIError(f"--steps must be a positive integer; got {args.steps}")
    try:
        contexts = tuple(int(length) for length in args.contexts.split(","))
    except ValueError:
        contexts = ()
    if not contexts or min(contexts) < 1:
        raise CLIError(f"--contexts must be comma-separated positive integers; got {args.contexts!r}")
    device = resolve_device(args.device)
    try:
        summary = run_quickstart(Path(args.out), steps=args.steps, device=device, seed=args.seed, contexts=contexts)
    except KeyboardInterrupt:  # outside training (which handles Ctrl-C itself): stop quietly
        print("transnormer-hf quickstart: interrupted", file=sys.stderr)
        return 130
    return 130 if summary["interrupted"] else 0


# ---- corpus and tokenizer


def load_corpus() -> tuple[list[str], list[str]]:
    """Docstrings (module, class, function) of CORPUS_MODULES, in file order; also the modules found."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents, found = [], []
    for name in CORPUS_MODULES:
        source = stdlib / f"{name}.py"
        if not source.is_file():
            source = stdlib / name / "__init__.py"  # packages (pathlib and zipfile became ones in 3.12-3.13)
        if not source.is_file():
            continue
        try:
            tree = ast.parse(source.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        found.append(name)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring and len(docstring) > 40:
                    documents.append(docstring)
    if sum(map(len, documents)) < 100_000:
        raise RuntimeError(f"the standard library under {stdlib} has too few docstrings to train on")
    return documents, found


def train_tokenizer(documents: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `documents`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tqdm.auto import tqdm
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bar = tqdm(documents, desc="tokenizer", unit="doc", dynamic_ncols=True)
    tokenizer.train_from_iterator(bar, trainer, length=len(documents))
    bar.close()
    pad, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=pad, bos_token=bos, eos_token=eos,
        clean_up_tokenization_spaces=False,
    )


def token_blocks(tokenizer, documents: list[str], length: int):
    """All documents tokenized, joined with EOS, cut into (num_blocks, length) int64 rows."""
    import torch

    stream: list[int] = []
    for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    usable = len(stream) // length * length
    return torch.tensor(stream[:usable], dtype=torch.int64).view(-1, length)


class _BlockDataset:
    """Rows of a (num_blocks, length) tensor as causal-LM examples (labels are the inputs; the model shifts)."""

    def __init__(self, blocks) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


# ---- training


def heldout_loss(model, blocks, device: str) -> float:
    """Mean causal-LM loss of `model` on `blocks`, without gradients."""
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=blocks.to(device), labels=blocks.to(device), use_cache=False).loss.item()
    model.train(was_training)
    return loss


def _progress_callback_class():
    from transformers.trainer_callback import ProgressCallback

    class LossProgress(ProgressCallback):
        """Trainer's tqdm bar with the loss as its postfix (instead of one printed dict per log) and a record."""

        def __init__(self) -> None:
            super().__init__()
            self.losses: list[tuple[int, float]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:
                self.training_bar.set_description("training")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append((state.global_step, float(logs["loss"])))
                if self.training_bar is not None:
                    self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

        def close(self) -> None:
            if self.training_bar is not None:
                self.training_bar.close()
                self.training_bar = None

    return LossProgress


def train(model, blocks, setup: QuickstartSetup, steps: int, device: str, seed: int):
    """Train with `Trainer`; returns (logged (step, loss) pairs, seconds, interrupted by Ctrl-C)."""
    import tempfile

    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import ProgressCallback

    work_dir = tempfile.TemporaryDirectory(prefix="tnl-quickstart-")  # Trainer wants one; nothing is kept there
    arguments = TrainingArguments(
        output_dir=work_dir.name, max_steps=steps, per_device_train_batch_size=setup.batch_size,
        learning_rate=setup.learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, min(30, steps // 10)),
        weight_decay=0.01, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
        seed=seed, data_seed=seed, use_cpu=device == "cpu", bf16=device == "cuda" and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0, dataloader_pin_memory=device == "cuda", disable_tqdm=False,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=_BlockDataset(blocks))
    progress = _progress_callback_class()()
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress)
    start = time.perf_counter()
    interrupted = False
    try:
        trainer.train()
    except KeyboardInterrupt:
        interrupted = True
        progress.close()
    seconds = time.perf_counter() - start
    work_dir.cleanup()
    # With bf16, accelerate wrapped model.forward in autocast; unwrapping restores the plain fp32 forward, so the
    # saved-and-reloaded model computes exactly what the in-memory one does.
    trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    model.eval()
    return progress.losses, seconds, interrupted


# ---- save, reload, sample


def save_and_reload(model, tokenizer, out_dir: Path, device: str):
    """Save model (safetensors), tokenizer and generation config; reload via Auto*; check identical logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir).to(device).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out_dir)
    probe = reloaded_tokenizer(list(SAMPLE_PROMPTS), return_tensors="pt", padding=True, padding_side="left")
    probe = {key: value.to(device) for key, value in probe.items()}
    with torch.no_grad():
        expected = model(**probe, use_cache=False).logits
        actual = reloaded(**probe, use_cache=False).logits
    if not torch.equal(expected, actual):
        difference = (expected - actual).abs().max().item()
        raise RuntimeError(f"the reloaded model's logits differ from the trained model's (max |diff| {difference:.3g})")
    return reloaded, reloaded_tokenizer


def sample(model, tokenizer, prompts, seed: int, device: str) -> tuple[list[str], float]:
    """One sampled continuation per prompt (generation_config's settings); returns texts and decode tokens/s."""
    import torch
    from tqdm.auto import tqdm

    # A short warm-up first, so the rate excludes one-time costs (Triton compiles and autotunes on first use).
    model.generate(**tokenizer(prompts[0], return_tensors="pt").to(device), max_new_tokens=2, do_sample=False)
    texts, new_tokens, seconds = [], 0, 0.0
    for index, prompt in enumerate(tqdm(prompts, desc="sampling", unit="prompt", dynamic_ncols=True)):
        torch.manual_seed(seed + index)
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        start = time.perf_counter()
        output = model.generate(**inputs)
        seconds += time.perf_counter() - start
        new_tokens += output.shape[1] - inputs["input_ids"].shape[1]
        texts.append(tokenizer.decode(output[0], skip_special_tokens=True))
    return texts, new_tokens / seconds


# ---- decode cost against a same-size Llama


def decode_scaling(tnl_model, contexts, steps: int, device: str, seed: int) -> list[dict]:
    """Per-token decode time and cache memory of TNL and a same-size Llama at each context length."""
    import torch
    from tqdm.auto import tqdm

    from .baselines import decode_step_seconds, same_size_llama

    torch.manual_seed(seed)
    llama = same_size_llama(tnl_model.config).to(device=device, dtype=tnl_model.dtype).eval()
    rows = []
    for context in tqdm(contexts, desc="decode cost", unit="context", dynamic_ncols=True):
        tnl_seconds, tnl_bytes = decode_step_seconds(tnl_model, context, steps, device)
        llama_seconds, llama_bytes = decode_step_seconds(llama, context, steps, device)
        rows.append(dict(context=context, tnl_ms_per_token=tnl_seconds * 1e3, tnl_cache_bytes=tnl_bytes,
                         llama_ms_per_token=llama_seconds * 1e3, llama_cache_bytes=llama_bytes))
    del llama
    return rows


# ---- plots


def plot_loss(losses: list[tuple[int, float]], heldout: tuple[float, float], path: Path) -> None:
    """Training loss per step, with the held-out loss before and after training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    if losses:
        steps, values = zip(*losses)
        axes.plot(steps, values, lw=1, label="training loss")
        axes.scatter([0, steps[-1]], heldout, color="C3", zorder=3, label="held-out loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats/token)")
    axes.set_title("TransNormerLLM quickstart: training loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_decode_scaling(rows: list[dict], device: str, path: Path) -> None:
    """Per-token decode time (left) and cache memory (right) against context length, TNL vs Llama."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [row["context"] for row in rows]
    figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for name, color in (("tnl", "C0"), ("llama", "C1")):
        label = "TransNormerLLM (recurrent state)" if name == "tnl" else "Llama (KV cache)"
        time_axes.plot(contexts, [row[f"{name}_ms_per_token"] for row in rows], "o-", color=color, label=label)
        memory_axes.plot(contexts, [row[f"{name}_cache_bytes"] / 2**20 for row in rows], "o-", color=color,
                         label=label)
    for axes in (time_axes, memory_axes):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("context length (tokens)")
        axes.grid(alpha=0.3, which="both")
        axes.legend()
    time_axes.set_ylabel("ms per generated token")
    time_axes.set_ylim(bottom=0)
    time_axes.set_title(f"decode step time ({device}, batch 1)")
    memory_axes.set_yscale("log")
    memory_axes.set_ylabel("cache memory (MiB)")
    memory_axes.set_title("state / KV cache memory")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---- the command


def _print_decode_table(rows: list[dict]) -> None:
    print(f"{'context':>8} | {'TNL ms/token':>12} {'TNL state':>10} | {'Llama ms/token':>14} {'Llama KV cache':>14}")
    for row in rows:
        print(f"{row['context']:>8} | {row['tnl_ms_per_token']:>12.2f} {row['tnl_cache_bytes'] / 2**20:>6.2f} MiB"
              f" | {row['llama_ms_per_token']:>14.2f} {row['llama_cache_bytes'] / 2**20:>10.2f} MiB")


def run_quickstart(out_dir: Path, steps: int, device: str, seed: int, contexts=DEFAULT_CONTEXTS,
                   setup: QuickstartSetup = QuickstartSetup()) -> dict:
    """The whole quickstart; prints as it goes and returns the summary it writes to DIR/quickstart.json."""
    import torch
    from transformers import GenerationConfig, set_seed

    from . import TransNormerLLMConfig, TransNormerLLMForCausalLM
    from transnormer_hf.kernels import resolve_backend

    silence_known_warnings()
    wall_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(seed)

    documents, modules = load_corpus()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    print(f"corpus: {len(documents):,} docstrings from {len(modules)} standard-library modules of Python {version} "
          f"({sum(map(len, documents)) / 1e6:.2f} M characters, PSF license)")
    tokenizer = train_tokenizer(documents, setup.vocab_size)
    blocks = token_blocks(tokenizer, documents, setup.sequence_length)
    generator = torch.Generator().manual_seed(seed)
    blocks = blocks[torch.randperm(blocks.shape[0], generator=generator)]
    heldout, blocks = blocks[: setup.heldout_blocks], blocks[setup.heldout_blocks:]
    print(f"tokenizer: byte-level BPE, {len(tokenizer):,} tokens; {blocks.numel():,} training tokens "
          f"in blocks of {setup.sequence_length}")

    config = TransNormerLLMConfig(
        vocab_size=len(tokenizer), hidden_size=setup.hidden_size, num_hidden_layers=setup.num_hidden_layers,
        num_attention_heads=setup.num_attention_heads, intermediate_size=setup.intermediate_size,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = TransNormerLLMForCausalLM(config).to(device)
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=setup.sample_new_tokens,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    parameters = model.num_parameters()
    print(f"model: TransNormerLLM, {parameters / 1e6:.2f} M parameters ({config.num_hidden_layers} layers, "
          f"hidden {config.hidden_size}, {config.num_attention_heads} heads), {device}, "
          f"attention backend {resolve_backend(config.attention_backend, torch.device(device))}")

    initial_loss = heldout_loss(model, heldout, device)
    losses, train_seconds, interrupted = train(model, blocks, setup, steps, device, seed)
    trained_steps = losses[-1][0] if losses else 0
    final_loss = heldout_loss(model, heldout, device)
    train_tokens = trained_steps * setup.batch_size * setup.sequence_length
    print(f"loss (held-out, nats/token): {initial_loss:.3f} at start -> {final_loss:.3f} after {trained_steps} steps"
          f" ({math.exp(final_loss):.0f} perplexity); training {train_tokens / train_seconds:,.0f} tokens/s")
    if interrupted:
        print(f"interrupted: training stopped at step {trained_steps} of {steps}; saving what was learned")

    model, tokenizer = save_and_reload(model, tokenizer, out_dir, device)
    print(f"saved: {out_dir}/ (model.safetensors, config.json, generation_config.json, tokenizer.json); "
          "reloaded with AutoModelForCausalLM/AutoTokenizer: logits identical")
    loss_plot = out_dir / "loss_curve.png"
    plot_loss(losses, (initial_loss, final_loss), loss_plot)
    summary = dict(
        interrupted=interrupted, device=device, seed=seed, steps=trained_steps, parameters=parameters,
        setup=asdict(setup), initial_loss=initial_loss, final_loss=final_loss, losses=losses,
        train_tokens_per_s=train_tokens / train_seconds, python=version,
        torch=torch.__version__, transformers=__import__("transformers").__version__,
    )
    if not interrupted:
        texts, decode_rate = sample(model, tokenizer, SAMPLE_PROMPTS, seed, device)
        print(f"samples (temperature 0.8, top-p 0.95; decoding {decode_rate:.0f} tokens/s):")
        for text in texts:
            print("  > " + " ".join(text.split()))
        rows = decode_scaling(model, contexts, setup.decode_steps, device, seed)
        print("decode cost per token at context length (one step after a cache of that length; Llama is "
              "a same-size random LlamaForCausalLM with its KV cache):")
        _print_decode_table(rows)
        decode_plot = out_dir / "decode_scaling.png"
        plot_decode_scaling(rows, device, decode_plot)
        summary.update(samples=texts, decode_tokens_per_s=decode_rate, decode_scaling=rows)
        print(f"plots: {loss_plot} {decode_plot}")
    else:
        print(f"plot: {loss_plot}")
    summary["wall_seconds"] = time.perf_counter() - wall_start
    (out_dir / "quickstart.json").write_text(json.dumps(summary, indent=1))
    print(f"done in {summary['wall_seconds']:.0f} s; summary: {out_dir / 'quickstart.json'}")
    return summary
