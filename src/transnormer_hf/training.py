"""`transnormer-hf train`: pre-train or fine-tune TransNormerLLM with the transformers `Trainer`.

Everything distributed is Trainer's (accelerate underneath): run the same command under
`torchrun --nproc-per-node N` or `accelerate launch` (DDP, FSDP2, DeepSpeed per the accelerate config).
Data loading and packing live in `data.py`.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import time
from pathlib import Path
from typing import Any

from .cli_common import CLIError
from .configuration_transnormer import PRESETS

# A few-second model for smoke tests and CPU experiments (not a released size).
TINY_PRESET = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
PRESET_NAMES = ("tiny", *PRESETS)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="pre-train or fine-tune with transformers.Trainer (LoRA, packing, DDP/FSDP via torchrun/accelerate)",
        description="Train TransNormerLLM with transformers.Trainer. Works as is under torchrun and accelerate launch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True,
                       help=f"a preset size to train from scratch ({', '.join(PRESET_NAMES)}), a local folder or a Hub id")
    model.add_argument("--tokenizer", default=None,
                       help="tokenizer folder or Hub id; 'bytes' = UTF-8 bytes (no download). Default: the model's "
                            "own tokenizer, or 'bytes' for a preset")
    model.add_argument("--attention-backend", choices=("auto", "torch", "triton"), default=None,
                       help="override the config's attention backend (Triton kernels or the torch path)")
    model.add_argument("--loss-chunk-size", type=int, default=None,
                       help="compute the loss this many tokens at a time without building the logits (0: off; "
                            "default: the config's)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True,
                      help="a .txt (one document per line), .jsonl/.json or .parquet file, a folder of them, "
                           "or a `datasets` name ('name' or 'name:config')")
    data.add_argument("--eval-data", default=None, help="evaluation data, same forms as --data")
    data.add_argument("--eval-fraction", type=float, default=0.0,
                      help="hold out this fraction of --data for evaluation (when --eval-data is not given)")
    data.add_argument("--text-column", default="text", help="the text field of JSONL/Parquet/datasets records")
    data.add_argument("--split", default="train", help="split of a `datasets` name")
    data.add_argument("--max-length", type=int, default=2048, help="tokens per row (packed row or document)")
    data.add_argument("--long-documents", choices=("error", "truncate", "split"), default="error",
                      help="what to do with documents longer than --max-length")
    data.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                      help="pack documents without padding (position_ids restart per document; exact)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--output-dir", required=True, help="checkpoints, the final model, loss.png")
    optim.add_argument("--batch-size", type=int, default=8, help="rows per device per step")
    optim.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    optim.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    optim.add_argument("--weight-decay", type=float, default=0.0)
    optim.add_argument("--warmup-steps", type=int, default=0)
    optim.add_argument("--scheduler", default="cosine", help="transformers lr_scheduler_type")
    optim.add_argument("--epochs", type=float, default=1.0)
    optim.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (overrides --epochs)")
    optim.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    optim.add_argument("--gradient-checkpointing", action="store_true", help="recompute layer activations in backward")
    optim.add_argument("--torch-compile", action="store_true", help="torch.compile the model")
    optim.add_argument("--context-parallel", type=int, default=1, metavar="N",
                       help="split each step's packed sequence across N consecutive ranks (exact; composes with "
                            "DDP/FSDP2 over the rest: processes = data-parallel x N); needs --packing")
    optim.add_argument("--seed", type=int, default=42)
    lora = parser.add_argument_group("LoRA (peft)")
    lora.add_argument("--lora", action="store_true", help="train LoRA adapters only")
    lora.add_argument("--lora-r", type=int, default=16)
    lora.add_argument("--lora-alpha", type=int, default=32)
    lora.add_argument("--lora-dropout", type=float, default=0.0)
    lora.add_argument("--lora-target-modules", default=None,
                      help="comma-separated module names or 'all-linear'; default: qkvu_proj,out_proj,l1,l2,l3")
    lora.add_argument("--load-in-4bit", action="store_true", help="QLoRA: 4-bit base weights (needs CUDA and bitsandbytes)")
    run = parser.add_argument_group("checkpoints and logging")
    run.add_argument("--resume", nargs="?", const="last", default=None,
                     help="resume from a checkpoint folder, or (no value) from the last one in --output-dir")
    run.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps")
    run.add_argument("--save-total-limit", type=int, default=None, help="keep at most N checkpoints")
    run.add_argument("--eval-steps", type=int, default=None, help="evaluate every N steps (default: --save-steps)")
    run.add_argument("--logging-steps", type=int, default=10)
    run.add_argument("--report-to", default="none", help="Trainer integrations (tensorboard, wandb, ...)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(handler=run_train)


def load_tokenizer(name: str | None, model_source: str):
    """The tokenizer and an `encode(text) -> ids` function; `name` None means the model's own (bytes for a preset)."""
    from .data import ByteTokenizer

    if name is None:
        name = "bytes" if model_source in PRESET_NAMES else model_source
    if name == "bytes":
        tokenizer = ByteTokenizer()
        return tokenizer, tokenizer.encode
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise CLIError(f"could not load a tokenizer from {name!r} ({error}); pass --tokenizer (or 'bytes')") from None
    return tokenizer, lambda text: tokenizer.encode(text, add_special_tokens=False)


def build_model(args: argparse.Namespace, tokenizer) -> Any:
    """A fresh model for a preset (vocabulary sized to the tokenizer), else `from_pretrained` in fp32."""
    import torch

    from .configuration_transnormer import TransNormerLLMConfig
    from .modeling_transnormer import TransNormerLLMForCausalLM

    overrides = {name: getattr(args, name) for name in ("attention_backend", "loss_chunk_size")
                 if getattr(args, name) is not None}
    if args.model in PRESET_NAMES:
        if args.load_in_4bit:
            raise CLIError("--load-in-4bit quantizes pretrained weights; it needs a model folder or Hub id, not a preset")
        special = {key: getattr(tokenizer, key, None) for key in ("pad_token_id", "bos_token_id", "eos_token_id")}
        fields = TINY_PRESET if args.model == "tiny" else PRESETS[args.model]
        config = TransNormerLLMConfig(**fields, vocab_size=len(tokenizer), **special, **overrides)
        torch.manual_seed(args.seed)
        return TransNormerLLMForCausalLM(config)
    load_kwargs: dict[str, Any] = {"dtype": torch.float32, **overrides}
    if args.load_in_4bit:
        load_kwargs.update(_quantization_kwargs())
    return TransNormerLLMForCausalLM.from_pretrained(args.model, **load_kwargs)


def _quantization_kwargs() -> dict[str, Any]:
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise CLIError("--load-in-4bit (QLoRA) needs a CUDA GPU; on CPU use --lora on full-precision weights")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise CLIError("--load-in-4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)}


def apply_lora(model: Any, args: argparse.Namespace) -> Any:
    """Wrap in a peft LoRA model; no --lora-target-modules means TNL's registered defaults."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if args.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    targets = args.lora_target_modules
    if targets is not None and targets != "all-linear":
        targets = [name.strip() for name in targets.split(",") if name.strip()]
    config = LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, target_modules=targets)
    return get_peft_model(model, config)


def _training_arguments(args: argparse.Namespace, has_eval: bool) -> Any:
    import torch
    from transformers import TrainingArguments

    accepted = inspect.signature(TrainingArguments).parameters
    # transformers 5.23 renamed gradient_checkpointing to activation_checkpointing (old name: deprecated alias).
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in accepted else "gradient_checkpointing"
    eval_every = args.eval_steps or args.save_steps
    return TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.scheduler,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        bf16=args.bf16,
        torch_compile=args.torch_compile,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_every if has_eval else None,
        prediction_loss_only=True,  # evaluation reports the loss; keeping (rows, length, vocab) logits costs GBs
        seed=args.seed,
        data_seed=args.seed,
        report_to=args.report_to,
        disable_tqdm=args.no_progress,
        remove_unused_columns=False,  # the collator builds exactly the model's inputs
        include_num_input_tokens_seen=True,
        # Without an accelerator, say so: accelerate then runs torchrun/accelerate-launch ranks as gloo DDP.
        use_cpu=not torch.accelerator.is_available(),
        **{checkpointing: args.gradient_checkpointing},
    )


def plot_losses(log_history: list[dict[str, Any]], path: Path) -> bool:
    """Training (and evaluation) loss against the optimizer step, as a PNG; False when nothing was logged."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    if not train and not evaluation:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for points, label, style in ((train, "train", "-"), (evaluation, "eval", "o--")):
        if points:
            axes.plot(*zip(*points), style, label=label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats / token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def _resume_checkpoint(resume: str | None, output_dir: str) -> str | None:
    if resume is None:
        return None
    if resume != "last":
        if not Path(resume).is_dir():
            raise CLIError(f"--resume: checkpoint folder not found: {resume}")
        return resume
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if last is None:
        raise CLIError(f"--resume: no checkpoint-* folder in {output_dir}")
    return last


def _validate(args: argparse.Namespace) -> None:
    # `accelerate launch` passes a config's parallelism_config to the processes as these variables; Trainer would
    # only refuse them at the first step (its context parallelism needs SDPA attention), after loading everything.
    accelerate_cp = os.environ.get("PARALLELISM_CONFIG_CP_SIZE", "1")
    if os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "").lower() == "true" and accelerate_cp.strip() != "1":
        raise CLIError(f"the accelerate config sets parallelism_config cp_size {accelerate_cp}: accelerate's context "
                       "parallelism is built for SDPA attention and Trainer refuses it for TNL; remove it from the "
                       f"config and pass --context-parallel {accelerate_cp} (see README: Long sequences across GPUs)")
    for name in ("batch_size", "grad_accum", "max_length", "save_steps", "logging_steps"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if not 0.0 <= args.eval_fraction < 1.0:
        raise CLIError(f"--eval-fraction must be in [0, 1); got {args.eval_fraction}")
    if args.load_in_4bit and not args.lora:
        raise CLIError("--load-in-4bit trains adapters on frozen 4-bit weights: add --lora")
    if args.lora and args.model in PRESET_NAMES:
        raise CLIError(f"--lora trains adapters on a pretrained model, but --model {args.model} is a preset trained "
                       "from scratch (adapters on its random weights could not be reloaded); give a model folder or "
                       "Hub id, or drop --lora")
    if args.model not in PRESET_NAMES:
        _check_model_source(args.model)
    if args.context_parallel < 1 or (args.context_parallel > 1 and not args.packing):
        raise CLIError(f"--context-parallel must be at least 1 and needs --packing; got {args.context_parallel} "
                       f"with packing {'on' if args.packing else 'off'}")


def _check_model_source(name: str) -> None:
    """`name` must be a folder or Hub id holding a TNL model (ours or the official format); anything else, LoRA
    adapters included, is a CLIError before anything is loaded."""
    import json

    from .generation_cli import TNL_MODEL_TYPES, _config_dict, _local_or_hub

    source = _local_or_hub(name, "--model")
    adapter_config = Path(source) / "adapter_config.json"
    if adapter_config.is_file() and not (Path(source) / "config.json").is_file():
        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        raise CLIError(f"--model {name!r} holds LoRA adapters (for base model {base!r}), not a model: give the base "
                       "model, or merge the adapters into it first (peft's merge_and_unload)")
    model_type = _config_dict(source).get("model_type", "transnormer")  # the official config.json has none
    if model_type not in TNL_MODEL_TYPES:
        raise CLIError(f"--model {name!r} is not a TransNormerLLM model (its config says model_type {model_type!r})")


def run_train(args: argparse.Namespace) -> int:
    """The `train` subcommand: read and pack the data, build the model, run Trainer, save, plot."""
    _validate(args)
    from transformers import Trainer

    from .data import PackedCollator, PaddedCollator, build_examples, read_documents, tokenize_documents

    tokenizer, encode = load_tokenizer(args.tokenizer, args.model)
    eos = getattr(tokenizer, "eos_token_id", None)

    def examples(source: str) -> tuple[list[dict[str, list[int]]], int]:
        sequences = tokenize_documents(read_documents(source, args.text_column, args.split), encode,
                                       args.max_length, eos, args.long_documents)
        return build_examples(sequences, args.max_length, args.packing), sum(map(len, sequences))

    train_rows, train_tokens = examples(args.data)
    eval_rows = examples(args.eval_data)[0] if args.eval_data else []
    if not eval_rows and args.eval_fraction > 0:
        held_out = max(1, int(len(train_rows) * args.eval_fraction))
        if held_out >= len(train_rows):
            raise CLIError(f"--eval-fraction {args.eval_fraction} leaves no training rows ({len(train_rows)} in all)")
        train_rows, eval_rows = train_rows[:-held_out], train_rows[-held_out:]

    model = build_model(args, tokenizer)
    if args.lora:
        model = apply_lora(model, args)
    pad_token_id = getattr(tokenizer, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos if eos is not None else 0
    collator = PackedCollator() if args.packing else PaddedCollator(pad_token_id)
    training_arguments = _training_arguments(args, bool(eval_rows))
    trainer_class, extra = Trainer, {}
    if args.context_parallel > 1:
        from .context_parallel import context_parallel_mesh, context_parallel_trainer_class

        mesh = context_parallel_mesh(args.context_parallel, training_arguments.device.type)
        trainer_class, extra = context_parallel_trainer_class(), {"context_parallel_group": mesh.get_group("cp")}
    trainer = trainer_class(
        model=model, args=training_arguments, train_dataset=train_rows,
        eval_dataset=eval_rows or None, data_collator=collator, **extra,
    )
    main_process = trainer.is_world_process_zero()
    if main_process:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"model {args.model}: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable "
              f"({100 * trainable / total:.2f}%)")
        print(f"data {args.data}: {train_tokens:,} tokens in {len(train_rows):,} "
              f"{'packed rows' if args.packing else 'documents'} of at most {args.max_length} tokens"
              + (f"; {len(eval_rows):,} rows for evaluation" if eval_rows else ""))

    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=_resume_checkpoint(args.resume, args.output_dir))
    elapsed = time.perf_counter() - started
    final_dir = Path(args.output_dir) / "final"
    written = save_final_model(trainer, tokenizer, final_dir)
    eval_loss = trainer.evaluate()["eval_loss"] if eval_rows else None
    if main_process:
        tokens = trainer.state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
        plot = Path(args.output_dir) / "loss.png"
        plotted = plot_losses(trainer.state.log_history, plot)
        summary = f"done: {trainer.state.global_step} steps, train loss {result.training_loss:.4f}"
        if eval_loss is not None:
            summary += f", eval loss {eval_loss:.4f} (perplexity {math.exp(min(eval_loss, 50)):.2f})"
        print(summary + f", {tokens / elapsed:,.0f} tokens/s over {elapsed:.1f} s")
        print(f"saved {'adapters' if args.lora else 'model'} to {final_dir} ({', '.join(written)})"
              + (f"; loss plot {plot}" if plotted else ""))
    finish_distributed_rank()
    return 0


def save_final_model(trainer: Any, tokenizer: Any, final_dir: Path) -> list[str]:
    """Save the trained model (or LoRA adapters) and the tokenizer to `final_dir`; call on every rank (gathering
    sharded weights is collective). Returns the names of the files written on the main process, after checking
    that they hold every trained weight (empty on the other ranks)."""
    if trainer.is_fsdp_enabled:
        # Under FSDP's SHARDED_STATE_DICT (the README's FSDP2 config) Trainer.save_model writes nothing at all;
        # the checkpoints stay sharded for resuming, the final model is gathered whole (transformers' FSDP guide).
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(final_dir))
    if not trainer.args.should_save:
        return []
    missing = _missing_weights(final_dir, trainer.accelerator.unwrap_model(trainer.model))
    if missing:
        raise CLIError(f"training finished but the final model was not saved to {final_dir}: {missing} (the "
                       f"checkpoint-* folders in {final_dir.parent} hold the trained state)")
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(final_dir))
    return sorted(path.name for path in final_dir.iterdir())


def _missing_weights(folder: Path, model: Any) -> str | None:
    """What `folder` lacks to be loaded with `from_pretrained` as `model` (a PEFT model: its adapters), or None."""
    import json

    from safetensors import safe_open

    adapters = hasattr(model, "peft_config")
    config_name, weights_name = (("adapter_config.json", "adapter_model.safetensors") if adapters
                                 else ("config.json", "model.safetensors"))
    if not (folder / config_name).is_file():
        return f"no {config_name}"
    index = folder / f"{weights_name}.index.json"
    if index.is_file():
        saved = set(json.loads(index.read_text())["weight_map"])
    elif (folder / weights_name).is_file():
        with safe_open(str(folder / weights_name), framework="pt") as weights:
            saved = set(weights.keys())
    else:
        return f"no {weights_name}"
    if adapters:  # peft names the saved adapters without the adapter name; count them
        expected = sum(parameter.requires_grad for parameter in model.parameters())
        return None if len(saved) >= expected else f"{len(saved)} of {expected} adapter tensors in {weights_name}"
    absent = sorted({name for name, _ in model.named_parameters()} - saved)
    return f"{len(absent)} weights absent from {weights_name} (e.g. {absent[0]})" if absent else None


def finish_distributed_rank() -> None:
    """Under a launcher (torchrun, accelerate launch): wait for every rank, leave the process group and end this
    process at once, skipping the interpreter's teardown; Python's exit handlers (logging, wandb) still run first.
    Does nothing without a process group.

    Why: with torch 2.13 on CPU (gloo), a rank intermittently aborted during that teardown ("terminate called
    without an active exception": a C++ thread still joinable when static objects are destroyed), or hung there,
    after its work had succeeded and been saved; torchrun then reported the whole run as failed.
    """
    import atexit
    import os
    import sys

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
