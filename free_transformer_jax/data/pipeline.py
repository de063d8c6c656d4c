"""The grain input pipeline: source -> process slice -> shuffle/epochs -> tokenize -> windows ->
packing -> batches -> (worker processes), as one checkpointable grain ``DatasetIterator``.

Every ``next()`` gives a dict of numpy int32 arrays of shape (batch_size, seq_len):
  inputs, targets    the tokens and the next tokens (targets never cross a document boundary)
  segment_ids        1..k for the documents of a row, in order; 0 = padding
  positions          position inside the document (window) of each token, from 0
  loss_mask          1 where the target is scored (every non-padding position), else 0
Padding positions hold the tokenizer's ``pad_id`` in inputs and targets.
"""

from __future__ import annotations

import functools
import grain
import jax
import numpy as np

from free_transformer_jax.data import sources, synthetic, tokenizers
from free_transformer_jax.model.config import ConfigError

PACKINGS = ("first_fit", "concat", "none")
FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


# Windows ------------------------------------------------------------------------------------------

def split_windows(tokens: np.ndarray, seq_len: int) -> list[dict[str, np.ndarray]]:
    """A document of n tokens -> (inputs, targets) windows of at most ``seq_len`` pairs.

    The n - 1 pairs (d[i], d[i+1]) are cut into consecutive chunks; window k covers tokens
    [k*seq_len, (k+1)*seq_len] (seq_len + 1 tokens), so consecutive windows share exactly one
    token and every target d[1:] appears in exactly one window. Documents of < 2 tokens give none.
    """
    tokens = np.asarray(tokens, np.int32)
    out = []
    for start in range(0, len(tokens) - 1, seq_len):
        chunk = tokens[start:start + seq_len + 1]
        out.append({"inputs": chunk[:-1], "targets": chunk[1:]})
    return out


class _Windows(grain.experimental.FlatMapTransform):
    """Flat-map form of :func:`split_windows` (picklable for worker processes)."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.max_fan_out = 1 << 20  # only read by the MapDataset flavour; we flat-map an IterDataset

    def flat_map(self, element):
        return split_windows(element, self.seq_len)


# Packing ------------------------------------------------------------------------------------------

def _pad_window(window: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """packing='none': one window per row."""
    n = len(window["inputs"])
    row = {k: np.zeros(seq_len, np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    row["inputs"][:n] = window["inputs"]
    row["targets"][:n] = window["targets"]
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n, dtype=np.int32)
    return row


def _rename_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain's packers name the metadata per feature; inputs and targets are packed identically."""
    return {"inputs": row["inputs"], "targets": row["targets"],
            "segment_ids": row["inputs_segment_ids"], "positions": row["inputs_positions"]}


class _JsonSafeConcatIterDataset(grain.IterDataset):
    """Wraps ConcatThenSplitIterDataset so its state survives a JSON round trip (as grain's Orbax
    handler does): grain 0.2.18 compares ``remainder_slices`` with the tuple (-1, -1), but JSON
    turns tuples into lists, so a restored state without a remainder would wrongly replay one."""

    def __iter__(self):
        return _JsonSafeConcatIterator(self._parent.__iter__())


class _JsonSafeConcatIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        state = dict(state)
        state["remainder_slices"] = {k: tuple(v) for k, v in state["remainder_slices"].items()}
        self._parent.set_state(state)


def _finalize(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """Adds loss_mask, writes pad_id at padding, makes every field int32."""
    seg = np.asarray(batch["segment_ids"], np.int32)
    real = seg > 0
    return {
        "inputs": np.where(real, batch["inputs"], pad_id).astype(np.int32),
        "targets": np.where(real, batch["targets"], pad_id).astype(np.int32),
        "segment_ids": seg,
        "positions": np.where(real, batch["positions"], 0).astype(np.int32),
        "loss_mask": real.astype(np.int32),
    }


def pack_and_batch(docs: grain.IterDataset, *, seq_len: int, packing: str, batch_size: int,
                   training: bool, pad_id: int, seed: int = 0,
                   num_packing_bins: int = 0) -> grain.IterDataset:
    """Token arrays (one per document) -> batches of packed rows (see the module docstring).

    first_fit: grain's FirstFitPackIterDataset over ``num_packing_bins`` rows (default
      batch_size): each window goes into the first row with room; a window is never split.
    concat: grain's ConcatThenSplitIterDataset: windows are concatenated and cut at seq_len, so
      rows have no padding except at the end of a finite pass. A window cut in two continues in
      the next row as a new segment (positions restart at 0; its first target is kept).
    none: one window per row, padded.
    Training drops a final partial batch (the stream is infinite anyway); evaluation pads it with
    all-padding rows (loss_mask 0) so every batch has the same shape.
    """
    if packing not in PACKINGS:
        raise ConfigError(f"data.packing={packing!r}: must be one of {PACKINGS}")
    windows = grain.experimental.FlatMapIterDataset(docs, _Windows(seq_len))
    lengths = {"inputs": seq_len, "targets": seq_len}
    if packing == "first_fit":
        rows = grain.experimental.FirstFitPackIterDataset(
            windows, length_struct=lengths, num_packing_bins=num_packing_bins or batch_size,
            seed=seed, shuffle_bins=training).map(_rename_packed)
    elif packing == "concat":
        rows = _JsonSafeConcatIterDataset(grain.experimental.ConcatThenSplitIterDataset(
            windows, length_struct=lengths)).map(_rename_packed)
    else:
        rows = windows.map(functools.partial(_pad_window, seq_len=seq_len))
    if training:
        batches = rows.batch(batch_size, drop_remainder=True)
    else:
        batches = rows.batch(batch_size, batch_fn=functools.partial(
            grain.experimental.batch_and_pad, batch_size=batch_size, pad_value=0))
    return batches.map(functools.partial(_finalize, pad_id=pad_id))


# The entry point ----------------------------------------------------------------------------------

def _check_data_config(data, batch_size: int) -> None:
    if data.seq_len < 1:
        raise ConfigError(f"data.seq_len={data.seq_len}: must be >= 1")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} per process: must be >= 1 (train.batch_size "
                          "must be a multiple of the number of processes)")
    if data.packing not in PACKINGS:
        raise ConfigError(f"data.packing={data.packing!r}: must be one of {PACKINGS}")
    if data.source == "synthetic" and data.seq_len < synthetic.SEQ_TOKENS - 1:
        raise ConfigError(f"data.seq_len={data.seq_len} is shorter than a synthetic record "
                          f"({synthetic.SEQ_TOKENS} tokens = {synthetic.SEQ_TOKENS - 1} input/target "
                          f"pairs); set --config.data.seq_len={synthetic.SEQ_TOKENS - 1}")
    if data.num_workers < 0:
        raise ConfigError(f"data.num_workers={data.num_workers}: must be >= 0")


def make_dataset(config, split: str, *, batch_size: int, seed: int, shard_index: int | None = None,
                 shard_count: int | None = None, training: bool | None = None) -> grain.IterDataset:
    """The grain IterDataset behind :func:`make_iterator` (same arguments)."""
    data = config.data
    _check_data_config(data, batch_size)
    tokenizer = tokenizers.make_tokenizer(config)
    if tokenizer.vocab_size > int(config.model.vocab_size):  # ids would overflow the embedding
        raise tokenizers.vocab_error(config, tokenizer)
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")

    split_name, is_train_split = sources.resolve_split(config, split)
    training = is_train_split if training is None else training
    source = sources.open_source(config, split_name, is_train_split)
    if len(source) < shard_count:
        raise ConfigError(f"data split {split_name!r} has {len(source)} records, fewer than the "
                          f"{shard_count} processes reading it; use a larger split")
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if training:
        if data.shuffle:
            ds = ds.shuffle(seed=seed % 2**32)
        ds = ds.repeat(None)  # epoch e is shuffled with the seed folded with e
    if data.source == "synthetic":
        ds = ds.map(sources.as_int32)
    else:
        ds = ds.map(sources.TokenizeDocument(tokenizer, data.text_key,
                                             bool(data.get("add_bos", True)), bool(data.add_eos)))
    read = grain.ReadOptions(num_threads=int(data.get("read_threads", 4)),
                             prefetch_buffer_size=int(data.get("read_buffer", 128)))
    docs = ds.to_iter_dataset(read)
    out = pack_and_batch(docs, seq_len=data.seq_len, packing=data.packing, batch_size=batch_size,
                         training=training, pad_id=tokenizer.pad_id, seed=seed)
    if data.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain workers read absl flags; outside app.run parse none
            flags.FLAGS.mark_as_parsed()
        out = out.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data.num_workers, per_worker_buffer_size=max(1, data.prefetch)))
    elif data.prefetch > 0:
        out = grain.experimental.ThreadPrefetchIterDataset(out, prefetch_buffer_size=data.prefetch)
    return out


def make_iterator(config, split: str, *, batch_size: int, seed: int, shard_index: int | None = None,
                  shard_count: int | None = None, training: bool | None = None) -> grain.DatasetIterator:
    """A checkpointable iterator of batches for this process.

    config: the full ConfigDict (``data`` and ``model`` sections). split: ``"train"`` (infinite,
    reshuffled every epoch), ``"eval"`` (one finite pass in source order) or a split name.
    batch_size: rows per batch for this process. seed: shuffling (and first-fit bin order).
    shard_index/shard_count: this process's slice of the source (default: the JAX process).
    training: override the mode implied by ``split`` (e.g. False: one finite, unshuffled pass over
    the training split).
    The iterator has ``get_state()``/``set_state()`` and works with grain's Orbax handler
    (``grain.checkpoint.CheckpointSave(it)`` / ``CheckpointRestore(it)``). Call ``close()`` when
    done if it uses worker processes.
    """
    return iter(make_dataset(config, split, batch_size=batch_size, seed=seed, shard_index=shard_index,
                             shard_count=shard_count, training=training))

