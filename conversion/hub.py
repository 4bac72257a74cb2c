"""`push`: model card and upload of a converted folder to the Hugging Face Hub (the only network code).

Only a folder that `convert` verified is uploaded: its `conversion.json` must be there and every weight file
must still have the sha256 recorded at verification. Uses `HfApi.create_repo` / `create_branch` /
`upload_folder` only, whose signatures are the same in huggingface_hub 1.x and 2.x; the token comes from the
standard login (`hf auth login` or HF_TOKEN).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import transnormer_hf

from .converter import RECORD_FILE
from .verify import sha256_files

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

TransNormerLLM (Lightning Attention; [arXiv 2307.14995](https://arxiv.org/abs/2307.14995)) {{ origin }},
converted with transnormer-hf {{ version }}: {{ format_note }}

## Usage

```python
{{ usage }}
```

## Verification

Every tensor was compared bitwise with the source{{ cast_note }}, and the reloaded model's logits with the
source model's on fixed ids, before anything was written in place.

| check | result |
|---|---|
| tensors | {{ v.tensors }} ({{ "{:,}".format(v.parameters) }} parameters, {{ "{:,.1f}".format(v.bytes / 1e6) }} MB, {{ v.dtype }}) |
| bitwise | {{ v.tensors }}/{{ v.tensors }} identical (max abs diff {{ v.tensor_max_diff }}) |
| logits | max abs diff {{ v.logits_max_diff }} on fixed ids of shape {{ v.logits_shape[:2] }} ({{ v.reloaded_with }}) |
| tokenizer | {{ v.tokenizer }} |
"""

USAGE_TRANSFORMERS = """import transnormer_hf  # pip install transnormer-hf: registers TransNormerLLM with transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=20)[0]))"""
USAGE_REMOTE = """

# without transnormer-hf installed, the code shipped in this repository runs instead:
model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)"""
USAGE_OFFICIAL = """# The official TransNormerLLM format: add the official remote code files (configuration_transnormer.py,
# modeling_transnormer.py, ...) from OpenNLPLab's repositories, or load it with transnormer-hf:
from transnormer_hf import TransNormerLLMForCausalLM

model = TransNormerLLMForCausalLM.from_pretrained("{repo_id}")"""


def read_verified_record(folder: Path) -> dict[str, Any]:
    """conversion.json of `folder`, after checking every weight file still has its verified sha256."""
    record_path = folder / RECORD_FILE
    if not record_path.is_file():
        raise ValueError(f"{folder} has no {RECORD_FILE}: only folders written (and verified) by `transnormer-hf convert` are pushed")
    record = json.loads(record_path.read_text())
    recorded = record.get("sha256") or {}
    missing = [name for name in recorded if not (folder / name).is_file()]
    if missing or not recorded:
        raise ValueError(f"{folder}: weight file(s) {missing or 'list'} from {RECORD_FILE} are missing; convert again")
    changed = [name for name, digest in sha256_files(folder, recorded).items() if digest != recorded[name]]
    if changed:
        raise ValueError(f"{folder}: {changed} changed since verification (sha256 differs); convert again before pushing")
    return record


def model_card(folder: Path, repo_id: str, record: dict[str, Any], license: str | None = None,
               base_model: str | None = None):
    """The README.md model card: metadata, a usage snippet and the verification numbers."""
    from huggingface_hub import ModelCard, ModelCardData

    source = record.get("source", {})
    base_model = base_model or source.get("repo_id")
    has_remote_code = "auto_map" in json.loads((folder / "config.json").read_text())
    tags = ["transnormer", "lightning-attention", "linear-attention"] + (["custom_code"] if has_remote_code else [])
    data = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", license=license or source.get("license") or "other",
        base_model=base_model, tags=tags,
    )
    official = record.get("format") == "official"
    usage = (USAGE_OFFICIAL if official else USAGE_TRANSFORMERS + (USAGE_REMOTE if has_remote_code else "")).format(repo_id=repo_id)
    verification = record["verification"]
    return ModelCard.from_template(
        data, template_str=CARD_TEMPLATE, title=repo_id.split("/")[-1],
        origin=f"from [{base_model}](https://huggingface.co/{base_model})" if base_model else "checkpoint",
        version=transnormer_hf.__version__, usage=usage, v=verification,
        format_note="the official checkpoint format." if official else
        "safetensors weights and `model_type: transnormer_llm`; any tokenizer is a fast one, no remote code needed.",
        cast_note="" if verification["cast"] == "none" else f" (cast {verification['cast']}, exactly)",
    )


def push(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    license: str | None = None,
    base_model: str | None = None,
    api: Any = None,
    log: Callable[[str], None] = print,
) -> str:
    """Write the model card into `folder`, then upload the folder to `repo_id`. Returns the commit URL."""
    folder = Path(folder)
    record = read_verified_record(folder)
    card = model_card(folder, repo_id, record, license, base_model)
    staged_card = folder / ".README.md.partial"
    staged_card.write_text(str(card))
    os.replace(staged_card, folder / "README.md")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), revision=revision, create_pr=create_pr,
        commit_message=f"Upload TransNormerLLM converted with transnormer-hf {transnormer_hf.__version__}",
        ignore_patterns=[".*"],
    )
    url = str(getattr(commit, "pr_url", None) or getattr(commit, "commit_url", None) or commit)
    log(f"pushed {folder} to {repo_id}" + (f" (revision {revision})" if revision else "") + f": {url}")
    return url
