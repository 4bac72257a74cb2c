"""`convert`: a released (official) or transformers-format checkpoint -> a verified checkpoint folder.

Steps: read and check the config and the tensor layout (names, shapes, the tie) without reading data; write
config, generation config, weights (streamed, sharded) and tokenizer into a staging folder next to DST;
verify every tensor bitwise and the logits of the reloaded model; record the numbers in `conversion.json`;
only then move the folder into place. Output is either our format (safetensors, model_type
"transnormer_llm", loads with AutoModelForCausalLM) or the official one (`to="official"`).
"""

from __future__ import annotations

import gc
import json
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig

import transnormer_hf
from transnormer_hf import TransNormerLLMForCausalLM

from .checkpoint import CheckpointReader, check_destination, parse_size, staged_directory, write_bin, write_safetensors
from .official import (
    DTYPES, EMBED_KEY, LM_HEAD_KEY, cast_exactly, check_layout, config_from_dict, official_config_dict, tie_source,
)
from .tokenizer import TOKENIZER_FILES, convert_tokenizer
from .verify import (
    Verification, bitwise_equal, compare_logits, compare_tensors, fixed_input_ids, model_from_tensors, sha256_files,
)

RECORD_FILE = "conversion.json"
FORMATS = ("transformers", "official")
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "tokenizer.model", "README.md"]


def resolve_source(src: str) -> tuple[Path, str | None]:
    """(local folder, Hub repo id or None): a folder is used as is; an `owner/name` id is downloaded."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path, None
    if path.exists():
        raise ValueError(f"SRC {src} is a file; pass the checkpoint folder (or a Hub repo id)")
    if not REPO_ID.fullmatch(src):
        raise ValueError(f"SRC {src} is neither an existing folder nor a Hub repo id like 'OpenNLPLab/TransNormerLLM-1B'")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(src, allow_patterns=HUB_PATTERNS)), src


def _source_license(folder: Path) -> str | None:
    card = folder / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(card).data.license
    except Exception:  # a README without (valid) metadata just has no license to carry over
        return None


class Source:
    """A checked source checkpoint: its config, its tensors (cast to the target dtype on read) and the tie.

    `names` maps each output tensor name to the source tensor it is read from, in storage order. With tied
    embeddings the shared tensor appears once, as the embedding, whichever key the source stored it under.
    """

    def __init__(self, folder: Path, repo_id: str | None, dtype: str) -> None:
        self.folder, self.repo_id = folder, repo_id
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ValueError(f"no config.json in {folder}")
        try:
            self.config = config_from_dict(json.loads(config_path.read_text()))
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path} is not valid JSON: {error}") from error
        self.reader = CheckpointReader(folder)
        infos = self.reader.infos()
        check_layout(infos, self.config, where=str(folder))
        self.tied_from = tie_source(infos, self.config)
        if self.tied_from is not None and EMBED_KEY in infos and LM_HEAD_KEY in infos:
            if not bitwise_equal(self.reader.tensor(EMBED_KEY), self.reader.tensor(LM_HEAD_KEY)):
                raise ValueError(
                    f"{folder}: {LM_HEAD_KEY} differs from {EMBED_KEY}, but the config ties them "
                    "(tie_word_embeddings); an untied checkpoint needs tie_word_embeddings: false in its config.json"
                )
            self.reader.release()
        self.names = {name: name for name in infos if self.tied_from is None or name not in (EMBED_KEY, LM_HEAD_KEY)}
        if self.tied_from is not None:
            self.names = {EMBED_KEY: self.tied_from, **self.names}
        self.target = DTYPES.get(dtype)
        self.layout = {out: (infos[name].shape, self.target or infos[name].dtype) for out, name in self.names.items()}
        self.config.dtype = self.target or infos[self.tied_from or EMBED_KEY].dtype
        dtypes = {infos[name].dtype for name in self.names.values()}
        self.cast = "none" if self.target is None or dtypes == {self.target} else (
            f"{'+'.join(sorted(str(d).removeprefix('torch.') for d in dtypes))} -> {str(self.target).removeprefix('torch.')}"
        )

    def tensor(self, out: str) -> torch.Tensor:
        """The output tensor `out`: the source tensor, cast exactly to the target dtype."""
        return cast_exactly(out, self.reader.tensor(self.names[out]), self.target)

    def tensors(self, outs: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for each output name, read in order; the source mapping is released at the end."""
        for out in outs:
            yield out, self.tensor(out)
        self.reader.release()

    def model(self) -> nn.Module:
        """The model made of exactly these tensors (the reference of the logits check)."""
        state = dict(self.tensors(self.names))
        if self.tied_from is not None:
            state[LM_HEAD_KEY] = state[EMBED_KEY]
        return model_from_tensors(self.config, state)


def _write_transformers(source: Source, staging: Path, max_shard_bytes: int) -> tuple[list[str], str, dict[str, str]]:
    """Our format: config, sharded safetensors (the tie stored once), fast tokenizer."""
    source.config.architectures = [TransNormerLLMForCausalLM.__name__]
    source.config.save_pretrained(staging)
    files = write_safetensors(staging, source.layout, source.tensors(source.names), max_shard_bytes)
    tokenizer = convert_tokenizer(source.folder, staging, source.config.pad_token_id, source.config.vocab_size)
    return files, tokenizer, {name: name for name in source.names}


def _write_official(source: Source, staging: Path, max_shard_bytes: int) -> tuple[list[str], str, dict[str, str]]:
    """The released format: official config names, .bin shards with both tied keys, tokenizer files copied."""
    official = official_config_dict(source.config, source.config.dtype)
    (staging / "config.json").write_text(json.dumps(official, indent=2, sort_keys=True) + "\n")
    shared = {LM_HEAD_KEY: EMBED_KEY} if source.tied_from is not None else {}
    layout = {**source.layout, **{alias: source.layout[target] for alias, target in shared.items()}}
    files = write_bin(staging, layout, lambda names: dict(source.tensors(names)), max_shard_bytes, shared)
    copied = [name for name in TOKENIZER_FILES if (source.folder / name).is_file()]
    for name in copied:
        shutil.copyfile(source.folder / name, staging / name)
    tokenizer = f"copied {', '.join(copied)}" if copied else "none in the source"
    return files, tokenizer, {name: name for name in source.names} | shared


def convert(
    src: str,
    dst: str | Path,
    dtype: str = "keep",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    to: str = "transformers",
    log: Callable[[str], None] = print,
) -> Verification:
    """Convert `src` (folder or Hub id) into `dst`, verified; see the module docstring. Returns the numbers."""
    if to not in FORMATS:
        raise ValueError(f"to must be one of {FORMATS}; got {to!r}")
    if dtype != "keep" and dtype not in DTYPES:
        raise ValueError(f"dtype must be 'keep' or one of {sorted(DTYPES)}; got {dtype!r}")
    dst = Path(dst)
    local = Path(src).expanduser()
    check_destination(dst, overwrite, [local] if local.exists() else [])
    max_shard_bytes = parse_size(max_shard_size)
    source = Source(*resolve_source(src), dtype)

    with staged_directory(dst) as staging:
        generation_file = source.folder / "generation_config.json"
        generation = (GenerationConfig.from_pretrained(source.folder) if generation_file.is_file()
                      else GenerationConfig.from_model_config(source.config))
        generation.save_pretrained(staging)
        write = _write_transformers if to == "transformers" else _write_official
        weight_files, tokenizer, written_from = write(source, staging, max_shard_bytes)

        # Verification: every written tensor (an alias is the tied key stored twice) against the source ...
        aliases = set(written_from) - set(source.names)
        count, parameters, size = compare_tensors(
            ((name, source.tensor(out)) for name, out in written_from.items()), CheckpointReader(staging),
            "the output", aliases=aliases,
        )
        source.reader.release()
        gc.collect()
        # ... then the logits of the reloaded output against a model built from the source tensors.
        loader = AutoModelForCausalLM if to == "transformers" else TransNormerLLMForCausalLM
        ids = fixed_input_ids(source.config.vocab_size)
        logits_diff = compare_logits(source.model, lambda: loader.from_pretrained(staging, dtype="auto").eval(), ids)
        gc.collect()

        verification = Verification(
            tensors=count, parameters=parameters, bytes=size, dtype=str(source.config.dtype).removeprefix("torch."),
            cast=source.cast, tensor_max_diff=0.0, logits_max_diff=logits_diff,
            logits_shape=[*ids.shape, source.config.vocab_size], reloaded_with=f"{loader.__name__}.from_pretrained",
            tokenizer=tokenizer, files=sorted(p.name for p in staging.iterdir()) + [RECORD_FILE],
        )
        record = {
            "format": to,
            "source": {"path": None if source.repo_id else str(source.folder), "repo_id": source.repo_id,
                       "license": _source_license(source.folder), "format": source.reader.format},
            "transnormer_hf_version": transnormer_hf.__version__,
            "verification": verification.to_dict(),
            "sha256": sha256_files(staging, weight_files),
        }
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    log(f"converted {src} -> {dst} ({to} format, {len(weight_files)} weight file(s)); verified:")
    for line in verification.summary():
        log(line)
    return verification
