"""Checkpoint conversion and Hub export for TransNormerLLM (`transnormer-hf convert [--to official]`,
`export-remote-code`, `push`). Imports the model; nothing in the model imports this package."""

from .converter import convert
from .hub import push
from .remote_code import export_remote_code, generate_bundle

__all__ = ["convert", "export_remote_code", "generate_bundle", "push"]
