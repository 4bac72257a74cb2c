"""`export-remote-code`: a flat, self-contained copy of the model code next to a checkpoint, plus `auto_map`.

People without transnormer-hf then load the folder with `trust_remote_code=True`. The files are generated
at export time from this package's own sources (never a hand-kept copy): each module is copied with its
imports rewritten to flat siblings (transformers copies only `from .sibling import` files; subpackages break
it, hf_conventions.md section 1.5), and Triton kernel files get their `import triton` guarded so CPU users
without Triton fall back to the torch path. The export is checked in a fresh Python process in which
`import transnormer_hf` fails: it must reproduce this package's logits exactly.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import transnormer_hf
import transnormer_hf.kernels

from .checkpoint import CheckpointReader, staged_directory
from .verify import fixed_input_ids, logits_of, quiet_loading

PACKAGE_DIR = Path(transnormer_hf.__file__).parent
KERNELS_DIR = Path(transnormer_hf.kernels.__file__).parent
KERNELS_MODULE = "kernels_transnormer"  # the bundle's name for transnormer_hf.kernels (its __init__)
AUTO_MAP = {
    "AutoConfig": "configuration_transnormer.TransNormerLLMConfig",
    "AutoModel": "modeling_transnormer.TransNormerLLMModel",
    "AutoModelForCausalLM": "modeling_transnormer.TransNormerLLMForCausalLM",
}
# kernels/__init__ imports its Triton modules lazily by dotted name; in the flat bundle they are siblings.
LAZY_KERNEL_IMPORT = 'f"{__name__}.{name}"'
FLAT_KERNEL_IMPORT = 'f"{__package__}.kernels_{name}"'
TRITON_IMPORT = re.compile(r"^(import triton\b.*|from triton\b.*)$", re.MULTILINE)


def bundle_sources() -> dict[str, Path]:
    """Bundle file name -> the package source it is generated from (Triton kernel files when present)."""
    sources = {
        "configuration_transnormer.py": PACKAGE_DIR / "configuration_transnormer.py",
        "cache_transnormer.py": PACKAGE_DIR / "cache_transnormer.py",
        "modeling_transnormer.py": PACKAGE_DIR / "modeling_transnormer.py",
        f"{KERNELS_MODULE}.py": KERNELS_DIR / "__init__.py",
    }
    for path in sorted(KERNELS_DIR.glob("*.py")):
        if path.name != "__init__.py":
            sources[f"kernels_{path.name}"] = path
    return sources


def _rewrite_imports(text: str, in_kernels: bool) -> str:
    """Point package imports at the flat siblings; anything else from transnormer_hf is an error."""

    def package_import(match: re.Match) -> str:
        indent, module, names = match.group(1), match.group(2), match.group(3)
        if module == "kernels":
            return f"{indent}from .{KERNELS_MODULE} import {names}"
        if module.startswith("kernels."):
            return f"{indent}from .kernels_{module.removeprefix('kernels.')} import {names}"
        return f"{indent}from .{module} import {names}"

    if in_kernels:  # first: the package rewrite below produces relative imports that are already flat
        text = re.sub(r"^(\s*)from \.(\w+) import (.*)$", r"\1from .kernels_\2 import \3", text, flags=re.MULTILINE)
    return re.sub(r"^(\s*)from transnormer_hf\.([\w.]+) import (.*)$", package_import, text, flags=re.MULTILINE)


def _guard_triton(text: str) -> str:
    """Move a kernel file's top-level Triton imports into try/except so a missing Triton is an ImportError
    the dispatcher catches (and transformers' import check, which skips try blocks, does not require Triton)."""
    imports = TRITON_IMPORT.findall(text)
    if not imports:
        return text
    guarded = ("try:  # optional: without Triton this module fails to import and the torch path runs\n"
               + "".join(f"    {line}\n" for line in imports)
               + "except ImportError as error:\n    raise ImportError(f\"Triton is not available: {error}\") from error\n")
    first = TRITON_IMPORT.search(text).start()
    text = TRITON_IMPORT.sub("", text)
    return text[:first] + guarded + text[first:].lstrip("\n")


def generate_bundle() -> dict[str, str]:
    """Bundle file name -> generated source text."""
    sources = bundle_sources()
    kernel_files = [name for name in sources if name.startswith("kernels_") and name != f"{KERNELS_MODULE}.py"]
    triton_files = [name for name in kernel_files if name != "kernels_reference.py"]
    bundle = {}
    for name, path in sources.items():
        text = path.read_text()
        text = _rewrite_imports(text, in_kernels=name.startswith("kernels_"))
        if name == f"{KERNELS_MODULE}.py":
            if text.count(LAZY_KERNEL_IMPORT) != 1:
                raise RuntimeError(
                    f"{path} no longer imports its Triton modules as {LAZY_KERNEL_IMPORT}; update "
                    "conversion/remote_code.py so the bundle finds its flat Triton siblings"
                )
            text = text.replace(LAZY_KERNEL_IMPORT, FLAT_KERNEL_IMPORT)
            if triton_files:
                # transformers copies only the siblings a file imports statically; this block never runs.
                text += "\n\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:  # lets transformers copy the Triton siblings\n"
                text += "".join(f"    from .{file[:-3]} import *  # noqa: F403\n" for file in triton_files)
        elif name in triton_files:
            text = _guard_triton(text)
        header = (f"# Generated by transnormer-hf {transnormer_hf.__version__} (`transnormer-hf export-remote-code`) from\n"
                  f"# {path.parent.name}/{path.name}; imports rewritten to flat siblings. Do not edit: re-export instead.\n")
        bundle[name] = header + text
    _check_flat(bundle)
    return bundle


def _check_flat(bundle: dict[str, str]) -> None:
    """Every import in the bundle is absolute to another package or relative to a sibling in the bundle."""
    siblings = {name[:-3] for name in bundle}
    for name, text in bundle.items():
        for node in ast.walk(ast.parse(text, filename=name)):
            if isinstance(node, ast.Import):
                bad = [alias.name for alias in node.names if alias.name.split(".")[0] == "transnormer_hf"]
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level == 0:
                    bad = [module] if module.split(".")[0] == "transnormer_hf" else []
                else:
                    bad = [] if node.level == 1 and module in siblings else [f"{'.' * node.level}{module}"]
            else:
                continue
            if bad:
                raise RuntimeError(f"remote-code bundle file {name} still imports {bad}: not self-contained")


REMOTE_LOGITS_SCRIPT = r"""
import importlib.abc, sys

class BlockTransnormerHF(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "transnormer_hf":
            raise ImportError(f"{name} is blocked: the exported code must not need it")

sys.meta_path.insert(0, BlockTransnormerHF())
try:
    import transnormer_hf  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("transnormer_hf is importable despite the blocker")

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

folder, ids_file, out_file = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype="auto").eval()
if not type(model).__module__.startswith("transformers_modules."):
    raise SystemExit(f"loaded {type(model).__module__}, not the exported remote code")
with torch.no_grad():
    logits = model(input_ids=load_file(ids_file)["ids"], use_cache=False).logits.float()
leaked = sorted(m for m in sys.modules if m.split(".")[0] == "transnormer_hf")
if leaked:
    raise SystemExit(f"transnormer_hf modules were imported: {leaked}")
save_file({"logits": logits.contiguous()}, out_file)
print(type(model).__module__)
"""


def remote_logits(folder: Path, ids: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Logits of `folder` loaded with trust_remote_code=True in a new process that cannot import transnormer_hf."""
    with tempfile.TemporaryDirectory(prefix="tnl-remote-check-") as scratch:
        scratch = Path(scratch)
        save_file({"ids": ids.contiguous()}, scratch / "ids.safetensors")
        env = {**os.environ, "HF_MODULES_CACHE": str(scratch / "modules"), "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(
            [sys.executable, "-c", REMOTE_LOGITS_SCRIPT, str(folder.resolve()), str(scratch / "ids.safetensors"),
             str(scratch / "logits.safetensors")],
            cwd=scratch, env=env, capture_output=True, text=True,
        )
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-8:]
            raise RuntimeError("the exported remote code failed to load without transnormer_hf:\n" + "\n".join(tail))
        return load_file(scratch / "logits.safetensors")["logits"], result.stdout.strip().splitlines()[-1]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # weights are not rewritten: a hard link costs nothing
    except OSError:
        shutil.copy2(src, dst)


def export_remote_code(dst: str | Path, verify: bool = True, log: Callable[[str], None] = print) -> list[str]:
    """Add the generated remote code and `auto_map` to the converted checkpoint folder `dst` (in place, atomically).

    With `verify`, the result must give this package's logits exactly when loaded in a process without it.
    Returns the files written.
    """
    dst = Path(dst)
    config_path = dst / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{dst} has no config.json: export-remote-code needs a converted checkpoint (run convert first)")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != transnormer_hf.TransNormerLLMConfig.model_type:
        raise ValueError(
            f"{dst}/config.json has model_type {config.get('model_type')!r}; run `transnormer-hf convert` first"
        )
    CheckpointReader(dst)  # fails clearly when there are no weights
    bundle = generate_bundle()
    with staged_directory(dst) as staging:
        for path in dst.iterdir():
            if path.is_file() and path.name not in bundle and path.name != "config.json":
                _link_or_copy(path, staging / path.name)
        for name, text in bundle.items():
            (staging / name).write_text(text)
        config["auto_map"] = dict(AUTO_MAP)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if verify:
            ids = fixed_input_ids(config["vocab_size"])
            with quiet_loading():
                model = AutoModelForCausalLM.from_pretrained(staging, dtype="auto").eval()
            expected = logits_of(model, ids)
            del model
            got, module = remote_logits(staging, ids)
            if not torch.equal(got, expected):
                raise ValueError(
                    f"the exported remote code gives different logits (max |diff| {(got - expected).abs().max().item():g})"
                )
            log(f"verified: loaded as {module} without transnormer_hf; logits identical on fixed ids {tuple(ids.shape)}")
    log(f"wrote {', '.join(sorted(bundle))} and auto_map to {dst}")
    return sorted(bundle)
