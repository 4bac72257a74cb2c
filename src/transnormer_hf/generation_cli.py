"""`transnormer-hf generate`: load a TNL model (our format or the official one) and its tokenizer, generate text."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from .cli_common import CLIError, resolve_device, silence_known_warnings

# A Hub repository id: "name" or "owner/name" (letters, digits, '-', '_', '.').
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
TNL_MODEL_TYPES = ("transnormer_llm", "transnormer")  # ours, the official remote-code one


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `generate` subcommand."""
    parser = subparsers.add_parser(
        "generate",
        help="generate text with a TNL model from a local folder or the Hub",
        description=(
            "Generate a continuation of PROMPT with a TransNormerLLM model: a folder saved by this package "
            "(e.g. by `quickstart`), an official OpenNLPLab checkpoint folder, or a Hub id. Sampling by "
            "default; --temperature 0 is greedy; --num-beams > 1 is beam search."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="local model folder or Hub id")
    parser.add_argument("prompt", metavar="PROMPT", help="text to continue")
    parser.add_argument("--tokenizer", metavar="NAME_OR_PATH",
                        help="tokenizer folder or Hub id when MODEL has none (the official folders have none)")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                        help="tokens to generate (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.8, metavar="T",
                        help="sampling temperature; 0 means greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=0.95, metavar="P",
                        help="nucleus sampling probability mass, in (0, 1] (default: %(default)s)")
    parser.add_argument("--num-beams", type=int, default=1, metavar="B",
                        help="beam search with B beams (deterministic; default: %(default)s)")
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    parser.add_argument("--device", default="auto", metavar="{auto,cpu,cuda}",
                        help="where to run; auto picks cuda when available (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default: %(default)s)")
    parser.set_defaults(handler=_run_from_args)


def _check_arguments(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be a positive integer; got {args.max_new_tokens}")
    if args.temperature < 0:
        raise CLIError(f"--temperature must be >= 0 (0 is greedy); got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise CLIError(f"--top-p must be in (0, 1]; got {args.top_p}")
    if args.num_beams < 1:
        raise CLIError(f"--num-beams must be a positive integer; got {args.num_beams}")
    if args.stream and args.num_beams > 1:
        raise CLIError("--stream works with one beam only: beam search decides the text at the end")


def _local_or_hub(name: str, what: str) -> str:
    """`name` as a local folder (which must exist) or a Hub id; a path that does not exist is a CLIError."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"{what} {name!r} is a file; give the folder that holds config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or not HUB_ID.match(name):
        raise CLIError(f"{what} folder {name!r} does not exist (and it is not a Hub id)")
    return name


def _config_dict(source: str) -> dict:
    """config.json of a local folder or Hub repository, as a dict."""
    local = Path(source)
    if local.is_dir():
        config_path = local / "config.json"
        if not config_path.is_file():
            raise CLIError(f"{source!r} is not a model folder: it has no config.json")
        try:
            return json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise CLIError(f"{config_path} is not valid JSON: {error}") from None
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(source, "config.json")).read_text())
    except Exception as error:  # offline, missing repo, gated...: one line, the library's first
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CLIError(f"could not read config.json of Hub model {source!r}: {first_line}") from None


def load_model_and_tokenizer(model_name: str, tokenizer_name: str | None, device: str):
    """A TNL model in eval mode on `device` and its tokenizer; anything that is not TNL is a CLIError."""
    from transformers import AutoTokenizer

    from . import TransNormerLLMForCausalLM

    source = _local_or_hub(model_name, "model")
    model_type = _config_dict(source).get("model_type", "transnormer")  # the official config.json has none
    if model_type not in TNL_MODEL_TYPES:
        raise CLIError(f"{model_name!r} is not a TransNormerLLM model (its config says model_type {model_type!r})")
    tokenizer_source = source if tokenizer_name is None else _local_or_hub(tokenizer_name, "tokenizer")
    try:
        # Never run a repository's tokenizer code (the official folders point auto_map at remote code).
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as error:
        if tokenizer_name is None:
            raise CLIError(
                f"no tokenizer found with model {model_name!r} (official checkpoint folders ship none); "
                "pass --tokenizer NAME_OR_PATH"
            ) from None
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CLIError(f"no tokenizer could be loaded from {tokenizer_name!r}: {first_line}") from None
    model = TransNormerLLMForCausalLM.from_pretrained(source).to(device).eval()
    if len(tokenizer) > model.config.vocab_size:
        raise CLIError(
            f"the tokenizer from {tokenizer_source!r} has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{model.config.vocab_size}: they do not belong together"
        )
    return model, tokenizer


def _progress_streamer(total: int):
    """A streamer that only advances a tqdm bar by one per generated token."""
    from tqdm.auto import tqdm
    from transformers.generation.streamers import BaseStreamer

    class ProgressStreamer(BaseStreamer):
        def __init__(self) -> None:
            self.bar = tqdm(total=total, desc="generating", unit="tok", leave=False, dynamic_ncols=True)
            self.prompt_seen = False

        def put(self, value) -> None:
            if not self.prompt_seen:  # generate() first puts the prompt
                self.prompt_seen = True
                return
            self.bar.update(1)

        def end(self) -> None:
            self.bar.close()

    return ProgressStreamer()


def _run_from_args(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    _check_arguments(args)
    device = resolve_device(args.device)
    silence_known_warnings()
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, device)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    if inputs["input_ids"].shape[1] == 0:
        # Nothing to condition on: start from BOS, as generate() does when it is given no input at all.
        if tokenizer.bos_token_id is None:
            raise CLIError("PROMPT is empty and the tokenizer has no BOS token to start from; give some text")
        inputs["input_ids"] = torch.tensor([[tokenizer.bos_token_id]])
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs = inputs.to(device)
    sampling = args.temperature > 0 and args.num_beams == 1
    options = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=sampling)
    if sampling:
        options.update(temperature=args.temperature, top_p=args.top_p)
    else:  # greedy or beams: switch off the sampling settings a saved generation_config may carry
        options.update(temperature=None, top_p=None, top_k=None)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        options["pad_token_id"] = tokenizer.eos_token_id
    if args.stream:
        options["streamer"] = TextStreamer(tokenizer, skip_special_tokens=True)
    elif args.num_beams == 1:
        options["streamer"] = _progress_streamer(args.max_new_tokens)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            output = model.generate(**inputs, **options)
    except KeyboardInterrupt:
        print("\ntransnormer-hf generate: interrupted", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - start
    new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
    if not args.stream:
        print(tokenizer.decode(output[0], skip_special_tokens=True))
    print(f"[{new_tokens} tokens in {seconds:.2f} s, {new_tokens / seconds:.0f} tokens/s, {device}]")
    return 0
