"""Local corpora as an ArrayRecord TFDS dataset (``local_text``), plus a SentencePiece trainer.

The builder lives in the package, not in a ``__main__`` script, so TFDS can register and name it.
``launch/prepare_data.py`` is the command-line front end; tests call :func:`build_dataset`
directly. Each example is ``{"text": str}`` (one document); splits are ``train`` and
``validation``. Reading back needs no TensorFlow: ``tfds.data_source("local_text",
split=..., data_dir=...)`` (see ``sources.py``).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sysconfig
import zlib
from typing import Callable, Iterable, Iterator, Sequence

import tensorflow_datasets as tfds

NAME = "local_text"
VERSION_STR = "1.0.0"
SPLITS = ("train", "validation")


class LocalText(tfds.core.GeneratorBasedBuilder):
    """Documents from local files. Construct with ``documents={"train": [...], "validation":
    [...]}`` (iterables of str) to write; without it the builder can only read a prepared copy."""

    VERSION = tfds.core.Version(VERSION_STR)
    RELEASE_NOTES = {VERSION_STR: "Documents from local text, JSONL or Python source files."}

    def __init__(self, *, documents: dict[str, Iterable[str]] | None = None, **kwargs):
        self._documents = documents
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo is built directly: dataset_info_from_configs would look for metadata files
        # next to the defining module.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local documents (one example per document) for free_transformer_jax.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        if self._documents is None:
            raise ValueError("LocalText needs documents= to generate data; use "
                             "launch/prepare_data.py")
        return {split: self._generate_examples(docs) for split, docs in self._documents.items()}

    def _generate_examples(self, docs: Iterable[str]):
        for i, text in enumerate(docs):
            yield i, {"text": text}


def dataset_dir(data_dir: str) -> str:
    return os.path.join(data_dir, NAME, VERSION_STR)


def build_dataset(data_dir: str, documents: dict[str, Iterable[str]], *,
                  overwrite: bool = False) -> tfds.core.DatasetBuilder:
    """Writes ``documents`` (split name -> texts) as ArrayRecord files under ``data_dir``."""
    target = dataset_dir(data_dir)
    if os.path.exists(target):
        if not overwrite:
            raise FileExistsError(f"{target} already exists; pass --overwrite to rebuild it")
        shutil.rmtree(target)
    builder = LocalText(data_dir=data_dir, documents=documents)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    downloads = os.path.join(data_dir, "downloads")  # TFDS creates it; nothing is downloaded
    if os.path.isdir(downloads) and not os.listdir(downloads):
        os.rmdir(downloads)
    return builder


# Document readers ---------------------------------------------------------------------------------

def python_stdlib_files(max_files: int = 0) -> list[str]:
    """The ``.py`` files of this Python installation's standard library (site-packages
    excluded), sorted: a real code corpus present on every machine."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages",
                                                               "__pycache__"))
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    files.sort()
    return files[:max_files] if max_files else files


def expand_globs(patterns: Sequence[str]) -> list[str]:
    files = sorted({f for p in patterns for f in glob.glob(os.path.expanduser(p), recursive=True)
                    if os.path.isfile(f)})
    if patterns and not files:
        raise FileNotFoundError(f"no files match {list(patterns)}")
    return files


def read_text_files(files: Iterable[str], *, by_paragraph: bool = False) -> Iterator[str]:
    """Each file is a document (or, with ``by_paragraph``, each blank-line separated block).
    Undecodable bytes become U+FFFD."""
    for path in files:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        if by_paragraph:
            yield from (p.strip("\n") for p in text.split("\n\n") if p.strip())
        elif text.strip():
            yield text


def read_jsonl_files(files: Iterable[str], text_key: str = "text") -> Iterator[str]:
    """One document per JSON line: the string under ``text_key``."""
    for path in files:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if text_key not in record:
                    raise KeyError(f"{path}:{lineno}: no key {text_key!r} (keys: {sorted(record)}); "
                                   "set --text_key")
                if str(record[text_key]).strip():
                    yield str(record[text_key])


def split_documents(docs: Iterable[str], *, validation_fraction: float = 0.05,
                    max_documents: int = 0) -> dict[str, list[str]]:
    """Deterministic train/validation split by a hash of each document's content (stable when
    documents are added or reordered), capped at ``max_documents`` in total (0 = no cap)."""
    out: dict[str, list[str]] = {"train": [], "validation": []}
    buckets = 10_000
    for n, text in enumerate(docs):
        if max_documents and n >= max_documents:
            break
        h = zlib.crc32(text.encode("utf-8", errors="replace")) % buckets
        out["validation" if h < validation_fraction * buckets else "train"].append(text)
    if not out["validation"] and len(out["train"]) > 1 and validation_fraction > 0:
        out["validation"].append(out["train"].pop())  # tiny corpora still get a validation split
    return out


# SentencePiece ------------------------------------------------------------------------------------

def _sentences(docs: Iterable[str], max_chars: int) -> Iterator[str]:
    """Lines of the documents (SentencePiece trains on lines), at most ``max_chars`` each."""
    for doc in docs:
        for line in doc.split("\n"):
            if line.strip():
                yield line[:max_chars]


def train_sentencepiece(docs: Iterable[str], model_prefix: str, vocab_size: int, *,
                        model_type: str = "bpe", max_sentences: int = 2_000_000,
                        num_threads: int = 0, log: Callable[[str], None] | None = None) -> str:
    """Trains a lossless SentencePiece model (identity normalisation, whitespace kept, byte
    fallback so any text round-trips, newlines included) and returns the ``.model`` path.
    ``vocab_size`` is an upper bound on small corpora (``hard_vocab_limit=False``)."""
    import sentencepiece as spm

    if vocab_size < 260:
        raise ValueError(f"--spm_vocab_size={vocab_size}: must be >= 260 (256 byte-fallback pieces "
                         "plus unk/bos/eos and at least one merge)")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(docs, 4096),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=4096,
        num_threads=num_threads or max(1, os.cpu_count() or 1),
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        minloglevel=2,
    )
    path = model_prefix + ".model"
    if log:
        log(f"wrote {path}")
    return path
