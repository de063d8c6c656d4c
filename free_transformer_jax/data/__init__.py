"""Data: the synthetic task, TFDS/ArrayRecord and local corpora, tokenizers, the grain pipeline.

Entry points: :func:`make_iterator` (checkpointable batches for the training loop),
:func:`check_vocab` (model.vocab_size must equal the tokenizer's), :func:`make_tokenizer`.
"""

from free_transformer_jax.data.pipeline import make_dataset, make_iterator, pack_and_batch, split_windows
from free_transformer_jax.data.tokenizers import (ByteTokenizer, SentencePieceTokenizer,
                                                  SyntheticTokenizer, check_vocab, make_tokenizer)

__all__ = ["make_dataset", "make_iterator", "pack_and_batch", "split_windows", "ByteTokenizer",
           "SentencePieceTokenizer", "SyntheticTokenizer", "check_vocab", "make_tokenizer"]
