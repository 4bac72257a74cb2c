"""The tokenizer: the released SentencePiece model (which needs remote code) as a fast `tokenizer.json`.

The fast tokenizer is built from the SentencePiece model's own settings (normalizer, dummy prefix, byte
fallback, merges ranked by score) and then checked: on a fixed set of sample texts it must give exactly the ids
of `sentencepiece` itself (when that package is installed), otherwise nothing is written. (Special-token
strings such as "<s>" inside a text are read as special tokens, as by the official transformers tokenizer.)
"""

from __future__ import annotations

import inspect
import json
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

SAMPLE_TEXTS = (
    "Hello world! This is TransNormerLLM.",
    "  leading spaces, trailing spaces   ",
    "multiple   spaces\tand\ttabs\nand\nnewlines\n\n",
    "数字 12345 and 3.14159, 中文和English混合。",
    "def f(x):\n    return x ** 2  # code",
    "Ünïcödé àccents, ß, ø, ñ; emoji 🙂🚀",
    "URL https://huggingface.co/OpenNLPLab?x=1&y=2",
    "a",
    "",
    "▁already escaped▁",
    "Line one.\r\nLine two.",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model")


def _wire_fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message: varints as ints, everything else as raw bytes."""
    fields, pos = [], 0

    def varint() -> int:
        nonlocal pos
        value, shift = 0, 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(data):
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value: int | bytes = varint()
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, pos = data[pos : pos + size], pos + size
        elif wire_type == 2:
            size = varint()
            value, pos = data[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        fields.append((number, value))
    return fields


def read_sentencepiece_model(model_file: Path) -> SimpleNamespace:
    """The parts of a SentencePiece ModelProto the converter needs, parsed without the protobuf package.

    Field numbers and defaults are those of sentencepiece_model.proto (pieces 1, trainer_spec 2,
    normalizer_spec 3); the result has the attribute names of the generated protobuf classes.
    """
    def signed(value: int) -> int:  # int32 fields are sign-extended to 64 bits on the wire
        return value - (1 << 64) if value >= 1 << 63 else value

    try:
        model = _wire_fields(model_file.read_bytes())
        pieces = []
        for number, value in model:
            if number == 1:
                entry = dict(_wire_fields(value))
                pieces.append(SimpleNamespace(
                    piece=entry.get(1, b"").decode(), score=struct.unpack("<f", entry[2])[0] if 2 in entry else 0.0,
                    type=entry.get(3, 1),
                ))
        trainer = dict(_wire_fields(next((value for number, value in model if number == 2), b"")))
        normalizer = dict(_wire_fields(next((value for number, value in model if number == 3), b"")))
    except (IndexError, KeyError, UnicodeDecodeError, struct.error, ValueError) as error:
        raise ValueError(f"{model_file} is not a SentencePiece model ({error})") from error
    trainer_spec = SimpleNamespace(
        model_type=trainer.get(3, 1), byte_fallback=bool(trainer.get(35, 0)), unk_id=signed(trainer.get(40, 0)),
        bos_id=signed(trainer.get(41, 1)), eos_id=signed(trainer.get(42, 2)), pad_id=signed(trainer.get(43, -1)),
        unk_piece=trainer.get(45, b"<unk>").decode(),
    )
    normalizer_spec = SimpleNamespace(
        precompiled_charsmap=normalizer.get(2, b""), add_dummy_prefix=bool(normalizer.get(3, 1)),
        remove_extra_whitespaces=bool(normalizer.get(4, 1)), escape_whitespaces=bool(normalizer.get(5, 1)),
    )
    return SimpleNamespace(pieces=pieces, trainer_spec=trainer_spec, normalizer_spec=normalizer_spec)


def _source_tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _build_fast(model_file: Path, add_bos: bool, add_eos: bool, pad_id: int | None):
    """A `PreTrainedTokenizerFast` equivalent to the SentencePiece model in `model_file`."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = read_sentencepiece_model(model_file)
    if proto.trainer_spec.model_type == 2:  # BPE: token -> id
        vocab: dict | list = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    elif proto.trainer_spec.model_type == 1:  # Unigram: (piece, score)
        vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    else:
        raise ValueError(f"{model_file}: only BPE and Unigram SentencePiece models convert; got model_type "
                         f"{proto.trainer_spec.model_type}")
    build = SpmConverter.build_tokenizer_from_spm_proto
    # ---- transformers version shim: older 5.x lack `legacy` (legacy=True is SentencePiece's own behaviour);
    # whatever the version builds, the id check in convert_tokenizer refuses a tokenizer that differs.
    extra = {"legacy": True} if "legacy" in inspect.signature(build).parameters else {}
    backend = build(proto, vocab, **extra)
    if backend is None:
        raise ValueError(f"{model_file}: transformers could not build a fast tokenizer from this SentencePiece model")

    def piece(index: int) -> str | None:
        return proto.pieces[index].piece if 0 <= index < len(proto.pieces) else None

    spec = proto.trainer_spec
    bos, eos, unk = piece(spec.bos_id), piece(spec.eos_id), piece(spec.unk_id)
    single = ([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else [])
    pair = single + ([f"{bos}:1"] if add_bos and bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos and eos else [])
    specials = [(token, token_id) for token, token_id in ((bos, spec.bos_id), (eos, spec.eos_id)) if token]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk,
        pad_token=piece(pad_id) if pad_id is not None else None, padding_side="left",
        add_bos_token=add_bos, add_eos_token=add_eos, clean_up_tokenization_spaces=False,
    )


def _check_ids(model_file: Path, saved: Path, add_bos: bool, add_eos: bool) -> int:
    """Reload the written tokenizer and compare its ids with SentencePiece's on SAMPLE_TEXTS; returns the count."""
    import sentencepiece
    from transformers import AutoTokenizer

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    fast = AutoTokenizer.from_pretrained(saved)
    for text in SAMPLE_TEXTS:
        expected = ([processor.bos_id()] if add_bos else []) + processor.encode(text) + ([processor.eos_id()] if add_eos else [])
        got = fast(text)["input_ids"]
        if got != expected:
            raise ValueError(
                f"the fast tokenizer converted from {model_file} disagrees with SentencePiece on {text!r}: "
                f"{got[:20]} vs {expected[:20]}; not writing a tokenizer that changes ids"
            )
    return len(SAMPLE_TEXTS)


def convert_tokenizer(src: Path, dst: Path, pad_id: int | None) -> str:
    """Put a fast tokenizer into `dst`; returns a one-line description for the summary.

    A source `tokenizer.json` is copied with its companions; a `tokenizer.model` (SentencePiece) is converted
    and checked id for id; no tokenizer in `src` is fine (weights-only checkpoints).
    """
    if (src / "tokenizer.json").is_file():
        copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
        for name in copied:
            shutil.copyfile(src / name, dst / name)
        return f"copied {', '.join(copied)}"
    model_file = src / "tokenizer.model"
    if not model_file.is_file():
        return "none in the source (no tokenizer.json or tokenizer.model)"
    config = _source_tokenizer_config(src)
    # BaiChuanTokenizer's class defaults (tnl_spec.md section 3) when the source has no tokenizer_config.json.
    add_bos, add_eos = bool(config.get("add_bos_token", True)), bool(config.get("add_eos_token", False))
    _build_fast(model_file, add_bos, add_eos, pad_id).save_pretrained(dst)
    shutil.copyfile(model_file, dst / "tokenizer.model")  # kept for the official code and for re-checking
    try:
        checked = _check_ids(model_file, dst, add_bos, add_eos)
    except ImportError:
        return "tokenizer.json from tokenizer.model (ids NOT checked: install sentencepiece to check them)"
    return f"tokenizer.json from tokenizer.model, same ids as SentencePiece on {checked} sample texts"
