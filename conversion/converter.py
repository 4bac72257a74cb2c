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
from collections.abc import Callable
from pathlib import Path

import torch
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
    folder, repo_id = resolve_source(src)

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"no config.json in {folder}")
    try:
        config_dict = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error
    config = config_from_dict(config_dict)
    reader = CheckpointReader(folder)
    infos = reader.infos()
    check_layout(infos, config, where=str(folder))
    tied_from = tie_source(infos, config)
    if tied_from is not None and EMBED_KEY in infos and LM_HEAD_KEY in infos:
        if not bitwise_equal(reader.tensor(EMBED_KEY), reader.tensor(LM_HEAD_KEY)):
            raise ValueError(
                f"{folder}: {LM_HEAD_KEY} differs from {EMBED_KEY}, but the config ties them (tie_word_embeddings); "
                "an untied checkpoint needs tie_word_embeddings: false in its config.json"
            )
        reader.release()

    # Output name -> source name, in storage order. Tied: the shared tensor is stored once (as the embedding).
    sources: dict[str, str] = {}
    for name in infos:
        if tied_from is not None and name in (EMBED_KEY, LM_HEAD_KEY):
            if name == tied_from:
                sources[EMBED_KEY] = name
        else:
            sources[name] = name
    target = DTYPES.get(dtype)
    layout = {out: (infos[name].shape, target or infos[name].dtype) for out, name in sources.items()}
    config.dtype = target or infos[tied_from or EMBED_KEY].dtype
    source_dtypes = sorted({str(infos[n].dtype).removeprefix("torch.") for n in sources.values()})
    cast = ("none" if target is None or all(infos[n].dtype == target for n in sources.values())
            else f"{'+'.join(source_dtypes)} -> {str(target).removeprefix('torch.')}")

    def source_tensors():
        for out, name in sources.items():
            yield out, cast_exactly(out, reader.tensor(name), target)
        reader.release()

    with staged_directory(dst) as staging:
        generation = (GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").is_file()
                      else GenerationConfig.from_model_config(config))
        generation.save_pretrained(staging)
        if to == "transformers":
            config.architectures = [TransNormerLLMForCausalLM.__name__]
            config.save_pretrained(staging)
            weight_files = write_safetensors(staging, layout, source_tensors(), max_shard_bytes)
            tokenizer = convert_tokenizer(folder, staging, config.pad_token_id)
            expected_names = dict(sources)
        else:
            official = official_config_dict(config, config.dtype)
            (staging / "config.json").write_text(json.dumps(official, indent=2, sort_keys=True) + "\n")
            shared = {LM_HEAD_KEY: EMBED_KEY} if tied_from is not None else {}
            bin_layout = dict(layout)
            if shared:
                bin_layout[LM_HEAD_KEY] = layout[EMBED_KEY]

            def load(names: list[str]) -> dict[str, torch.Tensor]:
                return {n: cast_exactly(n, reader.tensor(sources[n]), target) for n in names}

            weight_files = write_bin(staging, bin_layout, load, max_shard_bytes, shared)
            reader.release()
            copied = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
            for name in copied:
                (staging / name).write_bytes((folder / name).read_bytes())
            tokenizer = f"copied {', '.join(copied)}" if copied else "none in the source"
            expected_names = {**sources, **({LM_HEAD_KEY: tied_from} if shared else {})}

        def expected():
            for out, name in expected_names.items():
                yield out, cast_exactly(out, reader.tensor(name), target)
            reader.release()

        count, parameters, size = compare_tensors(
            expected(), CheckpointReader(staging), "the output", aliases=set(expected_names) - set(sources)
        )
        gc.collect()

        def reference():
            state = {out: cast_exactly(out, reader.tensor(name), target) for out, name in sources.items()}
            if tied_from is not None:
                state[LM_HEAD_KEY] = state[EMBED_KEY]
            model = model_from_tensors(config, state)
            reader.release()
            return model

        loader = AutoModelForCausalLM if to == "transformers" else TransNormerLLMForCausalLM
        logits_diff = compare_logits(
            reference, lambda: loader.from_pretrained(staging, dtype="auto").eval(), fixed_input_ids(config.vocab_size)
        )
        gc.collect()
        verification = Verification(
            tensors=count, parameters=parameters, bytes=size, dtype=str(config.dtype).removeprefix("torch."), cast=cast,
            tensor_max_diff=0.0, logits_max_diff=logits_diff, logits_shape=[*fixed_input_ids(1).shape, config.vocab_size],
            reloaded_with=f"{loader.__name__}.from_pretrained", tokenizer=tokenizer,
            files=sorted(p.name for p in staging.iterdir()) + [RECORD_FILE],
        )
        record = {
            "format": to,
            "source": {"path": str(folder) if repo_id is None else None, "repo_id": repo_id,
                       "license": _source_license(folder), "format": reader.format},
            "transnormer_hf_version": transnormer_hf.__version__,
            "verification": verification.to_dict(),
            "sha256": sha256_files(staging, weight_files),
        }
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    log(f"converted {src} -> {dst} ({to} format, {len(weight_files)} weight file(s)); verified:")
    for line in verification.summary():
        log(line)
    return verification
