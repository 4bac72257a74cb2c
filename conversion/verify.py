"""Verification of a written checkpoint: every tensor bitwise, then logits of the reloaded model on fixed ids.

Both checks run before anything is moved into place (see `checkpoint.staged_directory`); a failure raises and
the output is discarded. The numbers end up in the printed summary, in `conversion.json` and in the model card.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from transnormer_hf import TransNormerLLMConfig, TransNormerLLMForCausalLM

from .checkpoint import CheckpointReader

FIXED_INPUT_SHAPE = (2, 16)


@dataclass
class Verification:
    """What was checked and what came out; `summary()` is the text the CLI prints."""

    tensors: int = 0
    parameters: int = 0
    bytes: int = 0
    dtype: str = ""
    cast: str = "none"
    tensor_max_diff: float = 0.0
    logits_max_diff: float = 0.0
    logits_shape: list[int] = field(default_factory=list)
    reloaded_with: str = ""
    tokenizer: str = ""
    files: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        return [
            f"  tensors    {self.tensors} tensors, {self.parameters:,} parameters, {self.bytes / 1e6:,.1f} MB "
            f"({self.dtype}; cast: {self.cast})",
            f"  bitwise    {self.tensors}/{self.tensors} tensors identical to the source"
            + ("" if self.cast == "none" else " after the exact cast")
            + f" (max |diff| {self.tensor_max_diff:g})",
            f"  logits     max |diff| {self.logits_max_diff:g} on fixed ids {tuple(self.logits_shape[:2])}, "
            f"reloaded with {self.reloaded_with}",
            f"  tokenizer  {self.tokenizer}",
            f"  files      {' '.join(self.files)}",
        ]

    def to_dict(self) -> dict:
        return asdict(self)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so -0.0 vs 0.0 and NaN payloads count as differences)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def compare_tensors(
    expected: Iterable[tuple[str, torch.Tensor]], written: CheckpointReader, where: str, aliases: Iterable[str] = ()
) -> tuple[int, int, int]:
    """Compare each expected tensor with the one written under its name; returns (tensors, parameters, bytes).

    `aliases` are compared but not counted in parameters and bytes (a tied key stored with shared storage).
    """
    aliases = set(aliases)
    names_written = set(written.infos())
    count = parameters = size = 0
    seen = set()
    for name, tensor in expected:
        if name not in names_written:
            raise ValueError(f"verification failed: {name} is missing from {where}")
        got = written.tensor(name)
        if not bitwise_equal(got, tensor):
            raise ValueError(
                f"verification failed: {name} in {where} differs from the source ({got.dtype} {tuple(got.shape)} "
                f"vs {tensor.dtype} {tuple(tensor.shape)})"
            )
        seen.add(name)
        count += 1
        if name not in aliases:
            parameters += tensor.numel()
            size += tensor.numel() * tensor.element_size()
    if names_written - seen:
        raise ValueError(f"verification failed: {where} has tensors the source has not: {sorted(names_written - seen)[:5]}")
    written.release()
    return count, parameters, size


def fixed_input_ids(vocab_size: int) -> torch.Tensor:
    """The fixed (2, 16) ids the logits check runs on (seeded, independent of the global RNG)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(vocab_size, FIXED_INPUT_SHAPE, generator=generator)


def model_from_tensors(config: TransNormerLLMConfig, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A model holding exactly `tensors` (assigned, not copied); built on meta so no random init is spent."""
    with torch.device("meta"):
        model = TransNormerLLMForCausalLM(config)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


@torch.no_grad()
def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of a no-cache forward."""
    return model(input_ids=ids, use_cache=False).logits.float()


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide transformers' "Loading weights" progress bar while verifying (restored afterwards)."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def compare_logits(reference: Callable[[], nn.Module], reloaded: Callable[[], nn.Module], ids: torch.Tensor) -> float:
    """Logits of the source model vs the reloaded output; models are built one after the other (one in memory)."""
    model = reference()
    expected = logits_of(model, ids)
    del model
    with quiet_loading():
        model = reloaded()
    got = logits_of(model, ids)
    del model
    if got.shape != expected.shape:
        raise ValueError(f"verification failed: logits shape {tuple(got.shape)} != {tuple(expected.shape)}")
    max_diff = (got - expected).abs().max().item()
    if not torch.equal(got, expected):
        raise ValueError(f"verification failed: the reloaded model's logits differ from the source's (max |diff| {max_diff:g})")
    return max_diff


def sha256_files(folder: Path, names: Iterable[str]) -> dict[str, str]:
    """sha256 of each file, read in 16 MB blocks."""
    digests = {}
    for name in names:
        digest = hashlib.sha256()
        with open(folder / name, "rb") as file:
            while block := file.read(1 << 24):
                digest.update(block)
        digests[name] = digest.hexdigest()
    return digests
