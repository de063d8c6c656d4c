"""Local corpora as an ArrayRecord TFDS dataset (``local_text``), plus a SentencePiece trainer.

The builder lives in the package, not in a ``__main__`` script, so TFDS can register and name it.
``launch/prepare_data.py`` is the command-line front end; tests call :func:`build_dataset`
directly. Each example is ``{"text": str}`` (one document); splits are ``train`` and
``validation``. Reading back needs no TensorFlow: ``tfds.data_source("local_text",
split=..., data_dir=...)`` (see ``sources.py``).
"""

from __future__ import annotations

import json
import os
import sysconfig
import tempfile
import zlib
from typing import Callable, Iterable, Iterator, Sequence

import tensorflow_datasets as tfds

from free_transformer_jax import fs

NAME = "local_text"
VERSION_STR = "1.0.0"
SPLITS = ("train", "validation")


class CorpusError(ValueError):
    """Input documents that cannot make a dataset; the message names the file/line and the fix."""


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
    return fs.join(data_dir, NAME, VERSION_STR)


def build_dataset(data_dir: str, documents: dict[str, Iterable[str]], *,
                  overwrite: bool = False) -> tfds.core.DatasetBuilder:
    """Writes ``documents`` (split name -> texts) as ArrayRecord files under ``data_dir`` (a local
    path or gs://; TFDS writes through epath)."""
    target = fs.path(dataset_dir(data_dir))
    if target.exists():
        if not overwrite:
            raise CorpusError(f"{target} already exists; pass --overwrite to rebuild it")
        target.rmtree()
    fs.makedirs(data_dir, "--data_dir")
    builder = LocalText(data_dir=data_dir, documents=documents)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    downloads = fs.path(data_dir) / "downloads"  # TFDS creates it; nothing is downloaded
    if downloads.is_dir() and not list(downloads.iterdir()):
        downloads.rmtree()
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


def expand_globs(patterns: Sequence[str], flag: str = "--text_files") -> list[str]:
    """Sorted files matching any of ``patterns`` (local globs, ``**`` included, or gs://...)."""
    files = sorted({f for p in patterns for f in fs.glob(p)})
    if patterns and not files:
        raise CorpusError(f"{flag}: no files match {','.join(patterns)}; check the paths and quote "
                          "the globs")
    return files


def decode_text(data: bytes) -> str | None:
    """The UTF-8 text of a file's bytes, or None when they are not text (invalid UTF-8 or NUL
    bytes: binaries, images, archives, other encodings)."""
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_text_files(files: Iterable[str], *, by_paragraph: bool = False,
                    skipped: list[str] | None = None) -> Iterator[str]:
    """Each file is a document (or, with ``by_paragraph``, each blank-line separated block).
    A file that is not UTF-8 text is skipped (never decoded into replacement characters) and its
    path appended to ``skipped``."""
    for path in files:
        text = decode_text(fs.read_bytes(path))
        if text is None:
            if skipped is not None:
                skipped.append(os.fspath(path))
            continue
        if by_paragraph:
            yield from (p.strip("\n") for p in text.split("\n\n") if p.strip())
        elif text.strip():
            yield text


def read_jsonl_files(files: Iterable[str], text_key: str = "text") -> Iterator[str]:
    """One document per JSON line: the string under ``text_key``; every line is checked."""
    for path in files:
        data = fs.read_bytes(path)
        for lineno, line in enumerate(data.split(b"\n"), 1):
            if not line.strip():
                continue
            where = f"{os.fspath(path)}:{lineno}"
            text = decode_text(line)
            if text is None:
                raise CorpusError(f"{where}: not UTF-8 text; JSONL files must be UTF-8")
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{where}: not valid JSON ({e.msg}); give one JSON object per "
                                  "line") from None
            if not isinstance(record, dict):
                raise CorpusError(f"{where}: a JSON {type(record).__name__}, not an object; give "
                                  f'one object per line, e.g. {{"{text_key}": "..."}}')
            if text_key not in record:
                raise CorpusError(f"{where}: no key {text_key!r} (keys: {sorted(record)}); set "
                                  "--text_key")
            value = record[text_key]
            if not isinstance(value, str):
                raise CorpusError(f"{where}: {text_key!r} is a {type(value).__name__}, not a "
                                  "string; point --text_key at the text field")
            if value.strip():
                yield value


def split_documents(docs: Iterable[str], *, validation_fraction: float = 0.05,
                    max_documents: int = 0) -> dict[str, list[str]]:
    """Deterministic train/validation split by a hash of each document's content (stable when
    documents are added or reordered), capped at ``max_documents`` in total (0 = no cap). Both
    splits get at least one document; fewer than 2 documents is a :class:`CorpusError`."""
    if not 0 < validation_fraction < 1:
        raise CorpusError(f"--validation_fraction={validation_fraction}: must be in (0, 1)")
    if max_documents < 0:
        raise CorpusError(f"--max_documents={max_documents}: must be >= 0 (0 = all)")
    out: dict[str, list[str]] = {"train": [], "validation": []}
    buckets = 10_000
    for n, text in enumerate(docs):
        if max_documents and n >= max_documents:
            break
        h = zlib.crc32(text.encode("utf-8", errors="replace")) % buckets
        out["validation" if h < validation_fraction * buckets else "train"].append(text)
    n = len(out["train"]) + len(out["validation"])
    if n < 2:
        raise CorpusError(f"the inputs hold {n} non-empty document(s); a dataset needs at least 2 "
                          "(train and validation): add inputs, or pass --by_paragraph to make each "
                          "blank-line separated block of a text file a document")
    if not out["validation"]:
        out["validation"].append(out["train"].pop())  # tiny corpora still get a validation split
    if not out["train"]:
        out["train"].append(out["validation"].pop())
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
        raise CorpusError(f"--spm_vocab_size={vocab_size}: must be >= 260 (256 byte-fallback "
                          "pieces plus unk/bos/eos and at least one merge)")
    if fs.is_remote(model_prefix):  # SentencePiece writes local files: train here, then copy
        with tempfile.TemporaryDirectory() as tmp:
            local = train_sentencepiece(docs, os.path.join(tmp, "spm"), vocab_size,
                                        model_type=model_type, max_sentences=max_sentences,
                                        num_threads=num_threads)
            for ext in (".model", ".vocab"):
                fs.write_bytes(model_prefix + ext, fs.read_bytes(local[:-len(".model")] + ext))
        if log:
            log(f"wrote {model_prefix}.model")
        return model_prefix + ".model"
    fs.makedirs(os.path.dirname(os.path.abspath(model_prefix)), "--spm_model_prefix")
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
