r"""Builds the ``local_text`` ArrayRecord TFDS dataset (train + validation) from local documents,
and optionally trains a SentencePiece model on its training split.

Inputs (one of):
  --from_python_stdlib          the .py files of this Python's standard library (a real code
                                corpus on every machine; good for demos)
  --text_files='a/*.txt,b.md'   text files, one document per file (--by_paragraph: per block)
  --jsonl_files='d/*.jsonl'     one document per line, the string under --text_key

Example:
  python launch/prepare_data.py --from_python_stdlib --data_dir=/tmp/ftj_data \
      --max_documents=2000 --spm_vocab_size=4096
  then train with --config.data.source=tfds --config.data.tfds_name=local_text \
      --config.data.tfds_data_dir=/tmp/ftj_data --config.data.tokenizer=sentencepiece \
      --config.data.tokenizer_path=/tmp/ftj_data/spm.model --config.model.vocab_size=<printed>
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import run  # noqa: E402  (launch/common.py: one-line errors shared by the launchers)

from free_transformer_jax import fs  # noqa: E402
from free_transformer_jax.data import local_tfds  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "TFDS data_dir to write the dataset into.", required=True)
flags.DEFINE_bool("from_python_stdlib", False, "Use the Python standard library's .py files.")
flags.DEFINE_list("text_files", [], "Comma-separated globs of text files (one document per file).")
flags.DEFINE_bool("by_paragraph", False, "Text files: one document per blank-line separated block.")
flags.DEFINE_list("jsonl_files", [], "Comma-separated globs of JSONL files.")
flags.DEFINE_string("text_key", "text", "JSONL key holding the document text.")
flags.DEFINE_integer("max_files", 0, "Read at most this many files (0 = all).", lower_bound=0)
flags.DEFINE_integer("max_documents", 0, "Keep at most this many documents in total (0 = all).",
                     lower_bound=0)
flags.DEFINE_float("validation_fraction", 0.05, "Share of documents in the validation split.")
flags.DEFINE_bool("overwrite", False, "Replace an existing local_text dataset in --data_dir.")
flags.DEFINE_integer("spm_vocab_size", 0, "If > 0, train a SentencePiece model of at most this "
                     "many pieces on the train split (written to --spm_model_prefix.model).")
flags.DEFINE_string("spm_model_prefix", "", "Default: <data_dir>/spm.")
flags.DEFINE_enum("spm_model_type", "bpe", ["bpe", "unigram"], "SentencePiece model type.")


def collect_documents(skipped: list[str]):
    """The documents of the one input the flags name; files that are not text go to ``skipped``."""
    sources = [bool(FLAGS.from_python_stdlib), bool(FLAGS.text_files), bool(FLAGS.jsonl_files)]
    if sum(sources) != 1:
        sys.exit("error: give exactly one of --from_python_stdlib, --text_files, --jsonl_files")
    cap = FLAGS.max_files
    if FLAGS.from_python_stdlib:
        return local_tfds.read_text_files(local_tfds.python_stdlib_files(cap), skipped=skipped)
    if FLAGS.text_files:
        files = local_tfds.expand_globs(FLAGS.text_files, "--text_files")
        return local_tfds.read_text_files(files[:cap] if cap else files,
                                          by_paragraph=FLAGS.by_paragraph, skipped=skipped)
    files = local_tfds.expand_globs(FLAGS.jsonl_files, "--jsonl_files")
    return local_tfds.read_jsonl_files(files[:cap] if cap else files, FLAGS.text_key)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if 0 < FLAGS.spm_vocab_size < 260 or FLAGS.spm_vocab_size < 0:
        sys.exit(f"error: --spm_vocab_size={FLAGS.spm_vocab_size}: must be 0 (no SentencePiece "
                 "model) or >= 260 (256 byte-fallback pieces, unk/bos/eos and a merge)")
    skipped: list[str] = []
    try:
        splits = local_tfds.split_documents(collect_documents(skipped),
                                            validation_fraction=FLAGS.validation_fraction,
                                            max_documents=FLAGS.max_documents)
    except local_tfds.CorpusError as e:
        if skipped:
            raise local_tfds.CorpusError(f"{e} ({len(skipped)} input file(s) skipped as not UTF-8 "
                                         f"text, e.g. {skipped[0]})") from None
        raise
    if skipped:
        print(f"skipped {len(skipped)} file(s) that are not UTF-8 text, e.g. {skipped[0]}")
    local_tfds.build_dataset(FLAGS.data_dir, splits, overwrite=FLAGS.overwrite)
    sizes = {k: (len(v), sum(map(len, v))) for k, v in splits.items()}
    for split, (n, chars) in sizes.items():
        logging.info("%s: %d documents, %d characters", split, n, chars)
    print(f"wrote {local_tfds.dataset_dir(FLAGS.data_dir)}: " +
          ", ".join(f"{k} {n} docs / {c} chars" for k, (n, c) in sizes.items()))
    if FLAGS.spm_vocab_size:
        prefix = FLAGS.spm_model_prefix or fs.join(FLAGS.data_dir, "spm")
        path = local_tfds.train_sentencepiece(splits["train"], prefix, FLAGS.spm_vocab_size,
                                              model_type=FLAGS.spm_model_type)
        from free_transformer_jax.data.tokenizers import SentencePieceTokenizer

        vocab = SentencePieceTokenizer(path).vocab_size
        print(f"wrote {path} ({vocab} pieces): set --config.data.tokenizer=sentencepiece "
              f"--config.data.tokenizer_path={path} --config.model.vocab_size={vocab}")
    print(f"use --config.data.source=tfds --config.data.tfds_name={local_tfds.NAME} "
          f"--config.data.tfds_data_dir={FLAGS.data_dir}")


if __name__ == "__main__":
    run(main)
