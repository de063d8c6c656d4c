"""The grain input pipeline, as one checkpointable grain ``DatasetIterator``: per document stream
(one per row of the global batch by default), source slice -> shuffle/epochs -> tokenize ->
windows -> packing; then this process's streams -> batches -> (worker processes). The global
batch at a step does not depend on the number of processes (see :func:`make_dataset`).

Every ``next()`` gives a dict of numpy int32 arrays of shape (batch_size, seq_len):
  inputs, targets    the tokens and the next tokens (targets never cross a document boundary)
  segment_ids        1..k for the documents of a row, in order; 0 = padding
  positions          position inside the document (window) of each token, from 0
  loss_mask          1 where the target is scored (every non-padding position), else 0
Padding positions hold the tokenizer's ``pad_id`` in inputs and targets.
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import jax
import numpy as np
from absl import logging

from free_transformer_jax.data import sources, synthetic, tokenizers
from free_transformer_jax.model.config import ConfigError

PACKINGS = ("first_fit", "concat", "none")
DEFAULT_PACKING_BINS = 8  # first_fit rows packed together per stream (data.packing_bins)
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


def pack_rows(docs: grain.IterDataset, *, seq_len: int, packing: str, training: bool, seed: int = 0,
              num_packing_bins: int = 1) -> grain.IterDataset:
    """Token arrays (one per document) -> packed rows (dicts of inputs, targets, segment_ids,
    positions; not yet batched or finalized).

    first_fit: grain's FirstFitPackIterDataset over ``num_packing_bins`` rows: each window goes
      into the first row with room; a window is never split.
    concat: grain's ConcatThenSplitIterDataset: windows are concatenated and cut at seq_len, so
      rows have no padding except at the end of a finite pass. A window cut in two continues in
      the next row as a new segment (positions restart at 0; its first target is kept).
    none: one window per row, padded.
    """
    if packing not in PACKINGS:
        raise ConfigError(f"data.packing={packing!r}: must be one of {PACKINGS}")
    windows = grain.experimental.FlatMapIterDataset(docs, _Windows(seq_len))
    lengths = {"inputs": seq_len, "targets": seq_len}
    if packing == "first_fit":
        return grain.experimental.FirstFitPackIterDataset(
            windows, length_struct=lengths, num_packing_bins=max(1, num_packing_bins),
            seed=seed, shuffle_bins=training).map(_rename_packed)
    if packing == "concat":
        return _JsonSafeConcatIterDataset(grain.experimental.ConcatThenSplitIterDataset(
            windows, length_struct=lengths)).map(_rename_packed)
    return windows.map(functools.partial(_pad_window, seq_len=seq_len))


def pack_and_batch(docs: grain.IterDataset, *, seq_len: int, packing: str, batch_size: int,
                   training: bool, pad_id: int, seed: int = 0,
                   num_packing_bins: int = 0) -> grain.IterDataset:
    """Token arrays (one per document) -> batches of packed rows (see the module docstring and
    :func:`pack_rows`; first_fit packs over ``num_packing_bins`` rows, default batch_size).
    Training drops a final partial batch (the stream is infinite anyway); evaluation pads it with
    all-padding rows (loss_mask 0) so every batch has the same shape.
    """
    rows = pack_rows(docs, seq_len=seq_len, packing=packing, training=training, seed=seed,
                     num_packing_bins=num_packing_bins or batch_size)
    if training:
        batches = rows.batch(batch_size, drop_remainder=True)
    else:
        batches = rows.batch(batch_size, batch_fn=functools.partial(
            grain.experimental.batch_and_pad, batch_size=batch_size, pad_value=0))
    return batches.map(functools.partial(_finalize, pad_id=pad_id))


# Document streams: the global batch, whatever the process count -----------------------------------

class _StreamBatches(grain.IterDataset):
    """One batch per step from this process's document streams: ``rows_per_stream`` consecutive
    rows of each stream in turn (stream ids ascending). A finite stream that runs out gives
    all-padding rows; the pass ends when every stream has run out. See :func:`make_dataset`."""

    def __init__(self, streams: list[grain.IterDataset], stream_ids: list[int], rows_per_stream: int,
                 seq_len: int):
        super().__init__(streams)
        self.stream_ids, self.rows_per_stream, self.seq_len = stream_ids, rows_per_stream, seq_len

    def __iter__(self):
        return _StreamBatchesIterator(self)


class _StreamBatchesIterator(grain.DatasetIterator):
    def __init__(self, ds: _StreamBatches):
        super().__init__([p.__iter__() for p in ds.parents])
        self._ids, self._rows, self._seq_len = ds.stream_ids, ds.rows_per_stream, ds.seq_len
        self._exhausted: set[int] = set()

    def _pad_row(self) -> dict[str, np.ndarray]:
        return {k: np.zeros(self._seq_len, np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}

    def __next__(self):
        rows, alive = [], False
        for sid, it in zip(self._ids, self._parents):
            for _ in range(self._rows):
                if sid not in self._exhausted:
                    try:
                        rows.append(next(it))
                        alive = True
                        continue
                    except StopIteration:
                        self._exhausted.add(sid)
                rows.append(self._pad_row())
        if not alive:
            raise StopIteration
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def get_state(self):
        return {"streams": {str(sid): it.get_state() for sid, it in zip(self._ids, self._parents)},
                "exhausted": sorted(self._exhausted)}

    def set_state(self, state):
        streams = state["streams"]
        missing = [sid for sid in self._ids if str(sid) not in streams]
        if missing:
            raise ConfigError(f"the data-iterator state has no document stream(s) {missing[:4]} (it "
                              f"holds {len(streams)}): it was saved with another data.streams or "
                              "global batch size; resume with the run's own settings")
        for sid, it in zip(self._ids, self._parents):
            it.set_state(streams[str(sid)])
        self._exhausted = set(state.get("exhausted", ())) & set(self._ids)


def merge_process_states(states: list[dict]) -> dict:
    """The data-iterator states of all processes (``get_state()`` of each, in-process pipelines
    without worker processes) -> one state from which any process count can resume (each process
    picks its own streams in ``set_state``)."""
    merged: dict = {"streams": {}, "exhausted": []}
    for s in states:
        if "streams" not in s:
            raise ConfigError("only in-process data iterators (data.num_workers=0) can be merged "
                              "across process counts")
        merged["streams"].update(s["streams"])
        merged["exhausted"] += s.get("exhausted", [])
    merged["exhausted"] = sorted(set(merged["exhausted"]))
    return merged


def state_from_other_process_count(data_dir: Any, process_index: int | None = None,
                                   process_count: int | None = None) -> dict | None:
    """For resuming on another number of processes: the merged data-iterator state of a
    checkpoint's ``data`` directory (grain's ``process_<i>-of-<n>.json`` files) when it was
    written by a different process count, else None (this process's own file is there: grain's
    handler restores it as usual). ``data_dir``: a path or an ``epath.Path`` (gs:// works)."""
    import json

    from etils import epath

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    data_dir = epath.Path(data_dir)
    if not data_dir.exists() or (data_dir / f"process_{process_index}-of-{process_count}.json").exists():
        return None
    files = sorted(data_dir.glob("process_*-of-*.json"))
    if not files:
        return None
    written_by = {f.name.rsplit("-of-", 1)[1][:-len(".json")] for f in files}
    if len(written_by) != 1 or len(files) != int(next(iter(written_by))):
        raise ValueError(f"{data_dir}: incomplete data-iterator states ({[f.name for f in files]}); "
                          "the checkpoint is damaged")
    logging.info("data: merging the iterator states of %d processes (checkpoint written by another "
                 "process count) from %s", len(files), data_dir)
    return merge_process_states([json.loads(f.read_text()) for f in files])


class _UntilEveryProcessIsDone(grain.DatasetIterator):
    """A finite pass read by several JAX processes: every process must give the same number of
    batches (each batch is one global array), so a process whose streams ran out gives all-padding
    batches until every process has run out (one tiny all-gather per batch, on the calling
    thread, so every process calls it in the same order)."""

    def __init__(self, parent: grain.DatasetIterator, pad_batch: dict[str, np.ndarray]):
        super().__init__(parent)
        self._pad, self._local_done, self._done = pad_batch, False, False

    def __next__(self):
        if self._done:
            raise StopIteration
        batch = self._pad
        if not self._local_done:
            try:
                batch = next(self._parent)
            except StopIteration:
                self._local_done = True
        from jax.experimental import multihost_utils

        if not int(np.max(multihost_utils.process_allgather(np.int32(not self._local_done)))):
            self._done = True
            raise StopIteration
        return batch

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)

    def close(self):
        close = getattr(self._parent, "close", None)
        if close is not None:
            close()


def stream_layout(config, global_batch: int, shard_count: int) -> tuple[int, int]:
    """(number of document streams K, rows each stream gives per batch). K = ``data.streams``
    (default: the global batch size, one stream per row); it must divide the global batch and be
    a multiple of the process count."""
    k = int(config.data.get("streams", 0) or global_batch)
    if k < 1 or global_batch % k:
        raise ConfigError(f"data.streams={k} must divide the global batch size {global_batch} "
                          "(train.batch_size); set it to a divisor, or 0 for one stream per row")
    if k % shard_count:
        raise ConfigError(f"data.streams={k} is not a multiple of the {shard_count} processes; "
                          "use a multiple of the process count (0 = one stream per row)")
    return k, global_batch // k


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


def _stream_seed(seed: int, stream: int) -> int:
    """Each stream's shuffle seed: decorrelated across streams, independent of the process count."""
    return int(np.random.SeedSequence([seed % 2**32, stream]).generate_state(1)[0])


def make_dataset(config, split: str, *, batch_size: int, seed: int, shard_index: int | None = None,
                 shard_count: int | None = None, training: bool | None = None) -> grain.IterDataset:
    """The grain IterDataset behind :func:`make_iterator` (same arguments).

    The global batch (``batch_size * shard_count`` rows) is cut into K document streams
    (:func:`stream_layout`): stream k reads records k, k+K, k+2K, ... of the split (shuffled
    within the stream, reshuffled every epoch), packs them on its own and fills rows
    [k*R, (k+1)*R) of every global batch (R = rows per stream). Process i reads only streams
    [i*K/P, (i+1)*K/P), i.e. its contiguous rows of the global batch, so the global batch at a
    step is the same for any process count P (BUILD_NOTES "Multi-host").
    """
    data = config.data
    _check_data_config(data, batch_size)
    tokenizer = tokenizers.make_tokenizer(config)
    if tokenizer.vocab_size > int(config.model.vocab_size):  # ids would overflow the embedding
        raise tokenizers.vocab_error(config, tokenizer)
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    n_streams, rows_per_stream = stream_layout(config, batch_size * shard_count, shard_count)
    per_process = n_streams // shard_count
    stream_ids = list(range(shard_index * per_process, (shard_index + 1) * per_process))

    split_name, is_train_split = sources.resolve_split(config, split)
    training = is_train_split if training is None else training
    source = sources.open_source(config, split_name, is_train_split)
    if training and len(source) < n_streams:
        raise ConfigError(f"data split {split_name!r} has {len(source)} records, fewer than the "
                          f"{n_streams} document streams reading it (data.streams, default: one per "
                          "row of train.batch_size); use a larger split or set data.streams lower")
    if data.source == "synthetic":
        to_ids = sources.as_int32
    else:
        to_ids = sources.TokenizeDocument(tokenizer, data.text_key, bool(data.get("add_bos", True)),
                                          bool(data.add_eos))
    # the read threads are shared out over this process's streams (0 = read on the calling thread)
    threads = int(data.get("read_threads", 4)) // per_process
    read = grain.ReadOptions(num_threads=threads,
                             prefetch_buffer_size=max(1, int(data.get("read_buffer", 128)) // per_process))
    bins = int(data.get("packing_bins", 0)) or max(rows_per_stream, DEFAULT_PACKING_BINS)
    streams = []
    for k in stream_ids:
        ds = grain.MapDataset.source(source)[k::n_streams]
        if training:
            if data.shuffle:
                ds = ds.shuffle(seed=_stream_seed(seed, k))
            ds = ds.repeat(None)  # epoch e is shuffled with the seed folded with e
        docs = ds.map(to_ids).to_iter_dataset(read)
        streams.append(pack_rows(docs, seq_len=data.seq_len, packing=data.packing, training=training,
                                 seed=_stream_seed(seed, k), num_packing_bins=bins))
    out = _StreamBatches(streams, stream_ids, rows_per_stream, data.seq_len).map(
        functools.partial(_finalize, pad_id=tokenizer.pad_id))
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
    shard_index/shard_count: this process and the process count (default: the JAX process); the
    process gets its contiguous rows of each global batch (see :func:`make_dataset`).
    training: override the mode implied by ``split`` (e.g. False: one finite, unshuffled pass over
    the training split). A finite pass read by several JAX processes ends for all of them at once.
    The iterator has ``get_state()``/``set_state()`` and works with grain's Orbax handler
    (``grain.checkpoint.CheckpointSave(it)`` / ``CheckpointRestore(it)``). Call ``close()`` when
    done if it uses worker processes.
    """
    ds = make_dataset(config, split, batch_size=batch_size, seed=seed, shard_index=shard_index,
                      shard_count=shard_count, training=training)
    it = iter(ds)
    finite = not (sources.resolve_split(config, split)[1] if training is None else training)
    if (finite and jax.process_count() > 1 and shard_count in (None, jax.process_count())
            and shard_index in (None, jax.process_index())):
        pad = {k: np.zeros((batch_size, config.data.seq_len), np.int32)
               for k in ("inputs", "targets", "segment_ids", "positions")}
        it = _UntilEveryProcessIsDone(it, _finalize(pad, tokenizers.make_tokenizer(config).pad_id))
    return it
