"""The conversion subcommands of `transnormer-hf`: convert (both directions), export-remote-code, push."""

from __future__ import annotations

import argparse


def _convert(args: argparse.Namespace) -> int:
    from .converter import convert

    convert(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
            to=args.to)
    return 0


def _export_remote_code(args: argparse.Namespace) -> int:
    from .remote_code import export_remote_code

    export_remote_code(args.dst, verify=not args.no_verify)
    return 0


def _push(args: argparse.Namespace) -> int:
    from .hub import push

    push(args.dst, args.repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr,
         license=args.license, base_model=args.base_model)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add convert, export-remote-code and push."""
    parser = subparsers.add_parser(
        "convert", help="released or transformers checkpoint -> verified safetensors folder",
        description="Convert a released TransNormerLLM checkpoint (or one of ours) into safetensors, a config with "
        "model_type transnormer_llm and a fast tokenizer; every tensor and the logits are verified before DST is "
        "written.",
    )
    parser.add_argument("src", metavar="SRC", help="checkpoint folder or Hub repo id (official or transformers format)")
    parser.add_argument("dst", metavar="DST", help="output folder (must be empty or absent unless --overwrite)")
    parser.add_argument("--dtype", default="keep", choices=["keep", "bf16", "fp16", "fp32"],
                        help="weight dtype of the output (default: keep the source's)")
    parser.add_argument("--max-shard-size", default="5GB", help="shard the weights past this size (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST (only after verification)")
    parser.add_argument("--to", default="transformers", choices=["transformers", "official"],
                        help="output format (official: the released layout, for the official code)")
    parser.set_defaults(handler=_convert)

    parser = subparsers.add_parser(
        "export-remote-code", help="add self-contained modeling code + auto_map (trust_remote_code users)",
        description="Generate flat configuration/modeling/kernel files from this package into a converted folder and "
        "set auto_map; checked in a process where transnormer_hf cannot be imported.",
    )
    parser.add_argument("dst", metavar="DST", help="a folder written by `transnormer-hf convert`")
    parser.add_argument("--no-verify", action="store_true", help="skip the check in a separate process")
    parser.set_defaults(handler=_export_remote_code)

    parser = subparsers.add_parser(
        "push", help="write a model card and upload a verified folder to the Hub",
        description="Upload a folder written by `transnormer-hf convert` (weights unchanged since verification) "
        "with a model card; the token comes from `hf auth login` or HF_TOKEN.",
    )
    parser.add_argument("dst", metavar="DST", help="a folder written by `transnormer-hf convert`")
    parser.add_argument("repo_id", metavar="REPO_ID", help="owner/name on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--license", default=None, help="license metadata (default: the source's, else 'other')")
    parser.add_argument("--base-model", default=None, help="base_model metadata (default: the source Hub id)")
    parser.set_defaults(handler=_push)
