"""What the `transnormer-hf` dispatcher and its subcommands share: the user-facing error, --device, quiet output."""

from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda")


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def resolve_device(device: str) -> str:
    """Map --device (auto|cpu|cuda) to "cpu" or "cuda"; asking for cuda without a GPU is a CLIError."""
    import torch

    if device not in DEVICES:
        raise CLIError(f"--device must be one of {', '.join(DEVICES)}; got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was requested but torch sees no CUDA GPU; use --device cpu or auto")
    return device


def silence_known_warnings() -> None:
    """Hide the transformers output a CLI user cannot act on: the per-file bars of save and load.

    (The Trainer's pin_memory warning on CPU is avoided by not asking for pinned memory there.)
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the "Writing model shards" / "Loading weights" bars
