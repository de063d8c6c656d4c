"""Sample from a trained checkpoint, with control over the latent Z.

    python launch/sample.py --workdir=/tmp/ft_demo --prompt="K>" --num_samples=8 --z=shared
    python launch/sample.py --workdir=gs://bucket/run --prompts_file=gs://bucket/prompts.txt \
        --output=gs://bucket/samples.jsonl --mesh_tensor=4

--z=independent draws a fresh Z per sample; --z=shared gives all samples of a prompt one Z
sequence (prompt Z from the encoder, then one uniform code per new position). --z_seed and --seed
are separate random streams: fix --z_seed and vary --seed to see what Z decides, or the reverse.
Baseline checkpoints work too (Z options are then ignored). Parameters are restored straight into
their shardings (the checkpoint config's mesh with data folded into fsdp; --mesh_* override it)
and the samples are decoded on that mesh, rows split over its batch axes.
"""

import json
import sys

from absl import app, flags

from free_transformer_jax import distributed
from free_transformer_jax.logs import setup_console_logging
from common import run  # launch/common.py: one-line errors shared by the launchers

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).", lower_bound=0)
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "One prompt per line, or JSONL with a "
                                    '"prompt" field.')
_NUM = flags.DEFINE_integer("num_samples", 4, "Samples per prompt.", lower_bound=1)
_Z = flags.DEFINE_enum("z", "independent", ["independent", "shared"], "Latent control.")
_Z_SEED = flags.DEFINE_integer("z_seed", 0, "Seed of the Z stream.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the token stream.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per sample.",
                                lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "0 = greedy tokens (Z is always sampled).",
                                  lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k filtering (0 = off).", lower_bound=0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus filtering (1 = off).")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop strings, each a single token (default: EOS).")
_BOS = flags.DEFINE_bool("bos", True, "Prepend BOS when the tokenizer has one.")
_OUTPUT = flags.DEFINE_string("output", None, "Write JSONL here (local or gs://) instead of text to "
                              "stdout.")
_MESH = {axis: flags.DEFINE_integer(f"mesh_{axis}", None, f"Size of the {axis} mesh axis (-1: the "
                                    "remaining devices). Given axes replace the checkpoint config's "
                                    "mesh (others: data=1, fsdp=-1, tensor=1); default: that mesh "
                                    "with data folded into fsdp.")
         for axis in ("data", "fsdp", "tensor")}
distributed.define_flags()


def read_prompts() -> list[str]:
    from free_transformer_jax import fs

    prompts = list(_PROMPT.value)
    if _PROMPTS_FILE.value:
        text = fs.read_text(_PROMPTS_FILE.value, "--prompts_file")
        for n, line in enumerate(text.splitlines(), 1):
            if not line:
                continue
            if not line.lstrip().startswith("{"):
                prompts.append(line)
                continue
            try:
                record = json.loads(line)
                prompt = record["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                sys.exit(f'error: --prompts_file={_PROMPTS_FILE.value}:{n}: a JSON line needs a '
                         '"prompt" string, e.g. {"prompt": "K>"}')
            if not isinstance(prompt, str):
                sys.exit(f'error: --prompts_file={_PROMPTS_FILE.value}:{n}: "prompt" is a '
                         f"{type(prompt).__name__}, not a string")
            prompts.append(prompt)
    if not prompts:
        sys.exit("error: no prompts; give --prompt=TEXT (repeatable) or a non-empty --prompts_file")
    return prompts


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        distributed.initialize_from_flags()
    except distributed.DistributedError as e:
        sys.exit(f"error: {e}")
    setup_console_logging()  # -v sets the verbosity; Orbax/Grain INFO needs -v=1
    import jax

    from free_transformer_jax import fs
    from free_transformer_jax.checkpoint import load_model, params_mesh
    from free_transformer_jax.data import make_tokenizer
    from free_transformer_jax.generate import SamplingConfig, encode_prompts, generate

    prompts = read_prompts()
    config, cfg, params, step = load_model(_WORKDIR.value, step=_STEP.value,
                                           mesh_overrides={k: f.value for k, f in _MESH.items()})
    tok = make_tokenizer(config)
    ids = encode_prompts(tok, prompts, bos=_BOS.value)
    stop = []
    for s in _STOP.value:
        s_ids = tok.encode(s)
        if len(s_ids) != 1:
            sys.exit(f"error: --stop={s!r} is {len(s_ids)} tokens; each stop string must be one token")
        stop.append(s_ids[0])
    if not _STOP.value and tok.eos_id is not None:
        stop.append(tok.eos_id)
    try:
        sc = SamplingConfig(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                            top_k=_TOP_K.value, top_p=_TOP_P.value, stop_tokens=tuple(stop),
                            pad_id=tok.pad_id)
    except ValueError as e:
        sys.exit(f"error: --{e}")
    rows, groups, meta = [], [], []
    for i, p in enumerate(ids):
        for j in range(_NUM.value):
            rows.append(p)
            groups.append(i if _Z.value == "shared" else len(rows) - 1)
            meta.append((i, j))
    out = generate(cfg, params, rows, sc, z_key=jax.random.key(_Z_SEED.value),
                   token_key=jax.random.key(_SEED.value), z_groups=groups, mesh=params_mesh(params))
    p_len = out["prompt_len"]
    lines = []
    for r, ((i, j), new) in enumerate(zip(meta, out["new_tokens"])):
        text = tok.decode([t for t in new if t not in stop])
        if _OUTPUT.value:
            record = {"prompt": prompts[i], "prompt_index": i, "sample": j, "z": _Z.value,
                      "z_group": groups[r], "z_seed": _Z_SEED.value, "seed": _SEED.value,
                      "step": step, "text": text, "tokens": new,
                      "codes": out["codes"][r, p_len - len(rows[r]):p_len + len(new) - 1].tolist()}
            lines.append(json.dumps(record) + "\n")
        else:
            print(f"[prompt {i} sample {j} z-group {groups[r]}] {prompts[i]}{text}")
    if _OUTPUT.value and jax.process_index() == 0:
        fs.write_text(_OUTPUT.value, "".join(lines), "--output")
        print(f"wrote {len(lines)} samples to {_OUTPUT.value}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    import jax

    jax.config.config_with_absl()  # --jax_* flags
    run(main)
