"""Export a trained run as a Hugging Face Llama directory.

    python launch/export.py --workdir=/tmp/ft_demo --out=/tmp/ft_demo_hf [--step=N] [--decoder_only]

A baseline becomes a plain ``LlamaForCausalLM`` directory (config.json, model.safetensors, and the
tokenizer files when the run used SentencePiece). A Free Transformer gets the same directory for its
decoder plus its latent parameters in latent.safetensors, described by latent.json; start a run from
it again with --config.init.hf_llama_path=DIR. --decoder_only writes a Free Transformer's decoder
alone, as a plain Llama (it then equals the model with Z's contribution removed).
"""

import sys

from absl import app, flags

from free_transformer_jax.logs import setup_console_logging
from common import run  # launch/common.py: one-line errors shared by the launchers

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's --workdir.")
_OUT = flags.DEFINE_string("out", None, "Directory to write (new or empty).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_DECODER_ONLY = flags.DEFINE_bool("decoder_only", False, "For a Free Transformer: write the decoder "
                                  "alone as a plain Llama, without the latent parameters.")


def export(workdir: str, out: str, step: int | None = None, decoder_only: bool = False) -> list[str]:
    """Writes ``out`` from ``workdir``'s checkpoint; returns the files written."""
    from free_transformer_jax import convert
    from free_transformer_jax.checkpoint import load_model
    from free_transformer_jax.data.tokenizers import make_tokenizer

    config, cfg, params, step = load_model(workdir, step=step)
    data = config.data
    tokenizer = make_tokenizer(config)
    spm_model = data.tokenizer_path if (data.source != "synthetic" and
                                        data.tokenizer == "sentencepiece") else ""
    files = convert.export_hf(cfg, params, out, decoder_only=decoder_only, max_len=int(data.seq_len),
                              tokenizer=tokenizer, spm_model=spm_model,
                              add_bos=bool(data.get("add_bos", True)))
    kind = "Free Transformer" if cfg.latent else "baseline"
    print(f"exported step {step} ({kind}) to {out}: {', '.join(files)}")
    if convert.LATENT_FILE in files:
        print(f"  the decoder loads with transformers.LlamaForCausalLM.from_pretrained({out!r}) but is "
              f"only half the model; {convert.LATENT_FILE} holds the rest (see {convert.LATENT_JSON}). "
              f"Continue training from it with --config.init.hf_llama_path={out}")
    return files


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_console_logging()  # -v sets the verbosity; Orbax/Grain INFO needs -v=1
    from free_transformer_jax.checkpoint import CheckpointError
    from free_transformer_jax.model.config import ConfigError

    try:
        export(_WORKDIR.value, _OUT.value, _STEP.value, _DECODER_ONLY.value)
    except (ConfigError, CheckpointError) as e:  # ConversionError is a ConfigError
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "out"])
    run(main)
