"""Checkpoint files on disk: read weights one file at a time, write sharded safetensors or .bin, publish atomically.

Reading never executes pickled code: `.bin` files go through `torch.load(weights_only=True)` (memory-mapped when
the file allows it) and anything else is refused. Safetensors are written by a streaming writer (header first,
then each tensor's bytes), so writing holds one tensor at a time, and read back with plain file reads, so
verification does not keep a second copy of the checkpoint mapped.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# torch dtype <-> safetensors dtype string (the format's spelling).
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape, dtype and file of one stored tensor (no data)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str


def _numel(shape: Iterable[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '10KB' / '123' (bytes) -> bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    units = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    clean = text.strip().upper()
    for unit, factor in units.items():
        if clean.endswith(unit) and clean[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(clean[: -len(unit)]) * factor)
    if clean.isdigit():
        return int(clean)
    raise ValueError(f"max shard size must look like '5GB', '500MB' or a byte count; got {text!r}")


# ---------------------------------------------------------------------------------------------------- reading
def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True), memory-mapped when possible; a clear ValueError for anything else."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):  # legacy (non-zip) files cannot be mapped: read them whole
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"refused {path}: it holds objects other than tensors, so it was not unpickled (pickles are only read "
            f"with torch.load(weights_only=True); re-save it as a plain state dict with trusted code). {first_line}"
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"cannot read {path}: truncated or not a PyTorch checkpoint ({error})") from error
    if not isinstance(state, dict):
        raise ValueError(f"{path} must hold a state dict (name -> tensor); got {type(state).__name__}")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    return state


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse and check a safetensors header; returns (header, start of the data). Reads no tensor data."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ValueError(f"cannot read {path}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise ValueError(f"cannot read {path}: truncated safetensors file (header of {header_len} bytes, file {size})")
        try:
            header = json.loads(file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read {path}: corrupt safetensors header ({error})") from error
    data_start = 8 + header_len
    end = 0
    if not isinstance(header, dict):
        raise ValueError(f"cannot read {path}: corrupt safetensors header (not a JSON object)")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = TORCH_DTYPES[entry["dtype"]]
            begin, stop = entry["data_offsets"]
            fits = 0 <= begin and stop - begin == _numel(entry["shape"]) * _itemsize(dtype)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"cannot read {path}: corrupt safetensors entry for {name!r} ({error!r})") from error
        if not fits:
            raise ValueError(f"{path}: tensor {name!r} has data offsets {entry['data_offsets']} that do not fit its shape")
        end = max(end, stop)
    if data_start + end > size:
        raise ValueError(
            f"cannot read {path}: truncated safetensors file (its header needs {data_start + end} bytes, file has {size})"
        )
    return header, data_start


def _read_safetensors_tensor(path: Path, header: dict, data_start: int, name: str) -> torch.Tensor:
    entry = header[name]
    begin, stop = entry["data_offsets"]
    buffer = torch.empty(stop - begin, dtype=torch.uint8)
    with open(path, "rb") as file:
        file.seek(data_start + begin)
        if file.readinto(memoryview(buffer.numpy())) != stop - begin:
            raise ValueError(f"cannot read {path}: truncated while reading {name!r}")
    return buffer.view(TORCH_DTYPES[entry["dtype"]]).view(entry["shape"])


class CheckpointReader:
    """The weight files of one checkpoint folder (safetensors preferred over .bin, sharded or not).

    `infos()` lists every tensor without reading data; `iter_tensors()` yields them one file at a time;
    `tensor(name)` reads one tensor (safetensors: just that tensor's bytes).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.files, self.index = self._weight_files()
        self.format = "safetensors" if self.files[0].endswith(".safetensors") else "bin"
        self._headers: dict[str, tuple[dict, int]] = {}
        self._bin_cache: tuple[str, dict[str, torch.Tensor]] | None = None
        self._infos: dict[str, TensorInfo] | None = None

    def _weight_files(self) -> tuple[list[str], dict[str, str] | None]:
        for index_name, single_name in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE), (BIN_INDEX, BIN_SINGLE)):
            index_path = self.folder / index_name
            if index_path.is_file():
                try:
                    weight_map = json.loads(index_path.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise ValueError(f"{index_path} is not a valid index (needs a 'weight_map'): {error}") from error
                files = sorted(set(weight_map.values()))
                missing = [name for name in files if not (self.folder / name).is_file()]
                if missing:
                    raise ValueError(f"{index_path} names shard files that do not exist: {missing}")
                return files, weight_map
            if (self.folder / single_name).is_file():
                return [single_name], None
        raise ValueError(
            f"no weights in {self.folder}: expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or {BIN_INDEX}"
        )

    def _load_file(self, file: str) -> dict[str, torch.Tensor] | tuple[dict, int]:
        path = self.folder / file
        if self.format == "safetensors":
            if file not in self._headers:
                self._headers[file] = _read_safetensors_header(path)
            return self._headers[file]
        if self._bin_cache is None or self._bin_cache[0] != file:
            self._bin_cache = None  # drop the previous shard's mapping first
            self._bin_cache = (file, _load_bin(path))
        return self._bin_cache[1]

    def _file_infos(self, file: str) -> list[TensorInfo]:
        loaded = self._load_file(file)
        if self.format == "safetensors":
            header = loaded[0]
            return [TensorInfo(name, tuple(entry["shape"]), TORCH_DTYPES[entry["dtype"]], file)
                    for name, entry in header.items() if name != "__metadata__"]
        return [TensorInfo(name, tuple(t.shape), t.dtype, file) for name, t in loaded.items()]

    def infos(self) -> dict[str, TensorInfo]:
        """Every tensor's name, shape, dtype and file, in storage order; checks the index against the files."""
        if self._infos is None:
            infos: dict[str, TensorInfo] = {}
            for file in self.files:
                for info in self._file_infos(file):
                    if info.name in infos:
                        raise ValueError(f"tensor {info.name!r} is stored twice ({infos[info.name].file} and {file})")
                    infos[info.name] = info
            if self.index is not None:
                mismatched = sorted(
                    name for name in set(infos) | set(self.index) if self.index.get(name) != getattr(infos.get(name), "file", None)
                )
                if mismatched:
                    raise ValueError(
                        f"the index of {self.folder} does not match its shard files for {len(mismatched)} tensor(s), "
                        f"e.g. {mismatched[:5]}"
                    )
            self._infos = infos
            self.release()
        return self._infos

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read from its file."""
        info = self.infos()[name]
        loaded = self._load_file(info.file)
        if self.format == "safetensors":
            return _read_safetensors_tensor(self.folder / info.file, *loaded, name)
        return loaded[name]

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in storage order, one file at a time."""
        for name in self.infos():
            yield name, self.tensor(name)
        self.release()

    def release(self) -> None:
        """Drop the memory-mapped .bin shard held for random access."""
        self._bin_cache = None


# ---------------------------------------------------------------------------------------------------- writing
def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Split names (in order) into consecutive shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, size in sizes.items():
        if shards[-1] and filled + size > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return shards


def shard_file_names(stem: str, extension: str, count: int) -> list[str]:
    """transformers' names: model.safetensors, or model-00001-of-00003.safetensors ..."""
    if count == 1:
        return [f"{stem}.{extension}"]
    return [f"{stem}-{i:05d}-of-{count:05d}.{extension}" for i in range(1, count + 1)]


def _safetensors_header(infos: list[tuple[str, tuple[int, ...], torch.dtype]]) -> bytes:
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in infos:
        size = _numel(shape) * _itemsize(dtype)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(encoded)) + encoded


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def write_safetensors(
    folder: Path,
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    max_shard_bytes: int,
) -> list[str]:
    """Stream `tensors` (in `layout`'s order) into sharded safetensors plus an index when there are several.

    `layout` maps name -> (shape, dtype) of what will be written; each tensor must match it. Returns the files.
    """
    sizes = {name: _numel(shape) * _itemsize(dtype) for name, (shape, dtype) in layout.items()}
    shards = plan_shards(sizes, max_shard_bytes)
    files = shard_file_names("model", "safetensors", len(shards))
    stream = iter(tensors)
    for file, names in zip(files, shards):
        with open(folder / file, "wb") as handle:
            handle.write(_safetensors_header([(name, *layout[name]) for name in names]))
            for expected_name in names:
                name, tensor = next(stream)
                if name != expected_name or tuple(tensor.shape) != layout[name][0] or tensor.dtype != layout[name][1]:
                    raise RuntimeError(f"internal: tensor {name!r} {tuple(tensor.shape)} {tensor.dtype} out of plan")
                handle.write(_tensor_bytes(tensor))
    if len(files) > 1:
        weight_map = {name: file for file, names in zip(files, shards) for name in names}
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files + ([SAFETENSORS_INDEX] if len(files) > 1 else [])


def write_bin(
    folder: Path,
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]],
    load: Callable[[list[str]], dict[str, torch.Tensor]],
    max_shard_bytes: int,
    shared: dict[str, str],
) -> list[str]:
    """Write pytorch_model.bin shards (plus an index when several) as the released checkpoints are.

    `load(names)` returns those tensors; `shared` maps a name to the one whose storage it shares (tied weights:
    stored once, both keys present). A shared name costs no bytes and sits in its target's shard.
    """
    sizes = {name: 0 if name in shared else _numel(shape) * _itemsize(dtype) for name, (shape, dtype) in layout.items()}
    shards = plan_shards({name: size for name, size in sizes.items() if name not in shared}, max_shard_bytes)
    for alias, target in shared.items():
        next(names for names in shards if target in names).append(alias)
    files = shard_file_names("pytorch_model", "bin", len(shards))
    for file, names in zip(files, shards):
        own = [name for name in names if name not in shared]
        state = load(own)
        state.update({alias: state[target] for alias, target in shared.items() if alias in names})
        torch.save({name: state[name] for name in names}, folder / file)
        del state
    if len(files) > 1:
        weight_map = {name: file for file, names in zip(files, shards) for name in names}
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (folder / BIN_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files + ([BIN_INDEX] if len(files) > 1 else [])


# ---------------------------------------------------------------------------------------------------- publishing
def check_destination(dst: Path, overwrite: bool, sources: Iterable[Path] = ()) -> None:
    """Refuse a DST that is a file, a non-empty folder (without `overwrite`), or that contains / is inside a source."""
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"DST {dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ValueError(f"DST {dst} is not empty; pass --overwrite to replace it")
    resolved = dst.resolve()
    for source in sources:
        source = Path(source).resolve()
        if resolved == source or resolved in source.parents or source in resolved.parents:
            raise ValueError(f"DST {dst} and the source {source} overlap; write somewhere else")


@contextmanager
def staged_directory(dst: Path) -> Iterator[Path]:
    """A temporary folder next to DST; on success it replaces DST in one rename, on error it is deleted.

    DST (if any) is only moved aside once everything inside the block succeeded, so a failed run leaves it as
    it was and never leaves a half-written DST behind.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the published folder should be an ordinary one
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / "previous")
    os.replace(staging, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
