"""A small multiple-choice task built from the synthetic distribution, shipped for tests and demos
(``data/tasks/synthetic_choice.jsonl``): the context is a synthetic sequence cut just after the
first letter of its 8-letter run; the choices continue it for 7 characters with the right letter
or with three other letters (same `!` noise). A model trained on the synthetic task should pick
the prompt's letter; chance is 1/4."""

from __future__ import annotations

import json

import numpy as np

from free_transformer_jax import fs
from free_transformer_jax.data import synthetic

CONTINUATION = synthetic.RUN_LEN - 1


def make_examples(n: int, seed: int = 7, n_choices: int = 4) -> list[dict]:
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        rec = synthetic.generate(i, seed)
        cut = synthetic.PROMPT_LEN + rec.start + 1  # context ends after the run's first character
        context = synthetic.decode(rec.ids[:cut])
        cont = rec.ids[cut:cut + CONTINUATION]
        others = rng.choice([x for x in range(26) if x != rec.letter], n_choices - 1, replace=False)
        letters = [rec.letter] + [int(x) for x in others]
        order = rng.permutation(n_choices)
        choices = []
        for j in order:
            alt = np.where(cont == rec.letter, letters[j], cont)
            choices.append(synthetic.decode(alt))
        examples.append({"context": context, "choices": choices,
                         "label": int(np.flatnonzero(order == 0)[0])})
    return examples


def write_jsonl(path: str, examples: list[dict]) -> None:
    """One example per line (local or remote path); ``evaluate.read_choice_task`` reads it back."""
    fs.write_text(path, "".join(json.dumps(ex) + "\n" for ex in examples), "choice task")


if __name__ == "__main__":
    import os

    out = os.path.join(os.path.dirname(__file__), "..", "..", "data", "tasks", "synthetic_choice.jsonl")
    write_jsonl(out, make_examples(200))
    print(f"wrote {os.path.normpath(out)}")
