"""Random-access document sources chosen by ``config.data.source`` and their tokenisation.

``synthetic``: :class:`synthetic.SyntheticSource` (records are already ids). Training reads
records ``[0, synthetic_size)``; evaluation reads the next ``synthetic_eval_size`` records, so
the two never share an index.
``tfds``: any TFDS dataset prepared in ArrayRecord format, read with ``tfds.data_source`` (no
TensorFlow); each record is a dict whose ``data.text_key`` holds the text as bytes or str.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from free_transformer_jax.data import synthetic
from free_transformer_jax.data.tokenizers import Tokenizer
from free_transformer_jax.model.config import ConfigError

SOURCES = ("synthetic", "tfds")
DEFAULT_SYNTHETIC_EVAL_SIZE = 10_000


def resolve_split(config, split: str) -> tuple[str, bool]:
    """``split`` -> (split name, training?). ``"train"`` and ``"eval"`` are aliases for
    ``data.train_split`` and ``data.eval_split``; any other name is used as is (TFDS slicing
    such as ``"train[:1%]"`` works) and is a training split only if it equals ``data.train_split``."""
    data = config.data
    if split == "train":
        return data.train_split, True
    if split == "eval":
        return data.eval_split, False
    return split, split == data.train_split


def open_source(config, split_name: str, training: bool) -> Sequence[Any]:
    """The random-access source (``len`` and ``[i]``) for one split."""
    data = config.data
    if data.source == "synthetic":
        if training:
            return synthetic.SyntheticSource(data.synthetic_size, data.synthetic_seed, offset=0)
        size = int(data.get("synthetic_eval_size", DEFAULT_SYNTHETIC_EVAL_SIZE))
        return synthetic.SyntheticSource(size, data.synthetic_seed, offset=data.synthetic_size)
    if data.source == "tfds":
        return open_tfds(data.tfds_name, split_name, data.tfds_data_dir)
    raise ConfigError(f"data.source={data.source!r}: must be one of {SOURCES}")


def open_tfds(name: str, split: str, data_dir: str = "") -> Sequence[Any]:
    """``tfds.data_source`` with one-line errors naming the config fields to fix."""
    import tensorflow_datasets as tfds

    from free_transformer_jax.data import local_tfds  # noqa: F401  (registers "local_text")

    if not name:
        raise ConfigError("data.source='tfds' needs data.tfds_name (e.g. 'local_text' built by "
                          "launch/prepare_data.py)")
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # TFDS raises many types here (not found, bad split, wrong format)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"data.tfds_name={name!r}, split {split!r}, data.tfds_data_dir={data_dir!r}: cannot open "
            f"the ArrayRecord dataset ({type(e).__name__}: {first[:200]}); prepare it (e.g. "
            "launch/prepare_data.py --data_dir=DIR) and point data.tfds_data_dir at DIR") from None


def record_text(record: Any, text_key: str) -> str:
    """The text of one TFDS record (bytes are decoded as UTF-8 with replacement)."""
    if isinstance(record, dict):
        if text_key not in record:
            raise ConfigError(f"data.text_key={text_key!r} is not a feature of the dataset (features: "
                              f"{sorted(record)}); set data.text_key to the text feature")
        record = record[text_key]
    if isinstance(record, np.ndarray) and record.ndim == 0:
        record = record.item()
    if isinstance(record, (bytes, np.bytes_)):
        return bytes(record).decode("utf-8", errors="replace")
    if isinstance(record, str):
        return record
    raise ConfigError(f"data.text_key={text_key!r} holds {type(record).__name__}, not text")


class TokenizeDocument:
    """TFDS record -> int32 ids of one document: [BOS] + encode(text) + [EOS] (BOS/EOS per config
    and only if the tokenizer has them). A picklable callable, so grain workers can run it."""

    def __init__(self, tokenizer: Tokenizer, text_key: str, add_bos: bool, add_eos: bool):
        self.tokenizer, self.text_key = tokenizer, text_key
        self.bos = tokenizer.bos_id if add_bos else None
        self.eos = tokenizer.eos_id if add_eos else None

    def __call__(self, record: Any) -> np.ndarray:
        ids = self.tokenizer.encode(record_text(record, self.text_key))
        if not ids:
            return np.zeros((0,), np.int32)  # empty documents stay empty (skipped later)
        if self.bos is not None:
            ids = [self.bos] + ids
        if self.eos is not None:
            ids = ids + [self.eos]
        return np.asarray(ids, np.int32)


def as_int32(record: Any) -> np.ndarray:
    return np.asarray(record, np.int32)
