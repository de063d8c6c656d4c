"""Tokenizers behind one small interface, and the check that the model's vocabulary matches.

Interface: ``vocab_size``, ``encode(str) -> list[int]``, ``decode(ids) -> str``, ``bos_id``,
``eos_id``, ``pad_id`` (``None`` where the tokenizer has no such token). Decoding never fails on
bad input: invalid UTF-8 becomes U+FFFD and out-of-range or special ids are dropped.

Byte-level layout (no files, 259 ids): 0..255 are the raw UTF-8 bytes, 256 = PAD, 257 = BOS,
258 = EOS. The synthetic task has its own 29-symbol alphabet (see ``synthetic.py``).
"""

from __future__ import annotations

from typing import Iterable, Protocol

import numpy as np

from free_transformer_jax import fs
from free_transformer_jax.data import synthetic
from free_transformer_jax.model.config import ConfigError


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def _as_int_list(ids) -> list[int]:
    return [int(i) for i in np.asarray(ids).reshape(-1).tolist()]


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then PAD, BOS, EOS."""

    name = "byte"
    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in _as_int_list(ids) if 0 <= i < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file. Picklable (grain workers get the serialized model, not a
    path). ``pad_id`` falls back to 0 when the model has no PAD piece: padded positions are
    masked, so the id only has to be in range."""

    name = "sentencepiece"

    def __init__(self, path: str = "", *, model_proto: bytes | None = None):
        if model_proto is None:
            try:
                model_proto = fs.read_bytes(path, "data.tokenizer_path")
            except OSError as e:
                reason = e.strerror or str(e).rsplit(": ", 1)[-1]
                raise ConfigError(f"data.tokenizer_path={path!r}: cannot read the SentencePiece model "
                                  f"({reason}); train one with launch/prepare_data.py "
                                  "--spm_vocab_size=N or point the field at a .model file") from None
        self._path = path
        self._load(model_proto)

    def _load(self, model_proto: bytes) -> None:
        import sentencepiece as spm

        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = int(self._sp.get_piece_size())
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0

    def __getstate__(self):
        return {"path": self._path, "proto": self._proto}

    def __setstate__(self, state):
        self._path = state["path"]
        self._load(state["proto"])

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids) -> str:
        specials = {self.bos_id, self.eos_id, self.pad_id if self._sp.pad_id() >= 0 else None}
        keep = [i for i in _as_int_list(ids) if 0 <= i < self.vocab_size and i not in specials]
        return self._sp.decode(keep)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self._path!r}, vocab_size={self.vocab_size})"


class SyntheticTokenizer:
    """The synthetic task's 29-symbol alphabet (A..Z = 0..25, ``_`` = 26, ``!`` = 27, ``>`` = 28).
    No BOS/EOS: every record has the same fixed length."""

    name = "synthetic"
    vocab_size = synthetic.VOCAB_SIZE
    bos_id = None
    eos_id = None
    pad_id = synthetic.UNDERSCORE

    def encode(self, text: str) -> list[int]:
        return synthetic.encode(text)

    def decode(self, ids) -> str:
        return synthetic.decode([i for i in _as_int_list(ids) if 0 <= i < self.vocab_size])

    def __repr__(self) -> str:
        return "SyntheticTokenizer(vocab_size=29)"


TOKENIZERS = ("byte", "sentencepiece")


def make_tokenizer(config) -> Tokenizer:
    """The tokenizer a config's data section asks for (``config`` is the full ConfigDict)."""
    data = config.data
    if data.source == "synthetic":
        return SyntheticTokenizer()
    if data.tokenizer == "byte":
        return ByteTokenizer()
    if data.tokenizer == "sentencepiece":
        if not data.tokenizer_path:
            raise ConfigError("data.tokenizer='sentencepiece' needs data.tokenizer_path (a .model "
                              "file, e.g. from launch/prepare_data.py --spm_vocab_size=N)")
        return SentencePieceTokenizer(data.tokenizer_path)
    raise ConfigError(f"data.tokenizer={data.tokenizer!r}: must be one of {TOKENIZERS}")


def vocab_error(config, tokenizer: Tokenizer) -> ConfigError:
    what = ("the synthetic task's alphabet" if tokenizer.name == "synthetic"
            else f"the {tokenizer.name} tokenizer")
    return ConfigError(f"model.vocab_size={config.model.vocab_size} does not match {what} "
                       f"({tokenizer.vocab_size} ids); set --config.model.vocab_size="
                       f"{tokenizer.vocab_size}")


def check_vocab(config, tokenizer: Tokenizer | None = None) -> Tokenizer:
    """Raises a one-line ConfigError unless ``model.vocab_size`` equals the tokenizer's size;
    returns the tokenizer. Call before training starts."""
    tokenizer = tokenizer or make_tokenizer(config)
    if int(config.model.vocab_size) != tokenizer.vocab_size:
        raise vocab_error(config, tokenizer)
    return tokenizer
