"""Sample from a trained checkpoint, with control over the latent Z.

    python launch/sample.py --workdir=/tmp/ft_demo --prompt="K>" --num_samples=8 --z=shared
    python launch/sample.py --workdir=/tmp/run --prompts_file=prompts.txt --output=samples.jsonl

--z=independent draws a fresh Z per sample; --z=shared gives all samples of a prompt one Z
sequence (prompt Z from the encoder, then one uniform code per new position). --z_seed and --seed
are separate random streams: fix --z_seed and vary --seed to see what Z decides, or the reverse.
Baseline checkpoints work too (Z options are then ignored).
"""

import json
import sys

from absl import app, flags, logging

from free_transformer_jax import distributed

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "One prompt per line, or JSONL with a "
                                    '"prompt" field.')
_NUM = flags.DEFINE_integer("num_samples", 4, "Samples per prompt.")
_Z = flags.DEFINE_enum("z", "independent", ["independent", "shared"], "Latent control.")
_Z_SEED = flags.DEFINE_integer("z_seed", 0, "Seed of the Z stream.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the token stream.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "0 = greedy tokens (Z is always sampled).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k filtering (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus filtering (1 = off).")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop strings, each a single token (default: EOS).")
_BOS = flags.DEFINE_bool("bos", True, "Prepend BOS when the tokenizer has one.")
_OUTPUT = flags.DEFINE_string("output", None, "Write JSONL here instead of text to stdout.")
distributed.define_flags()


def read_prompts() -> list[str]:
    prompts = list(_PROMPT.value)
    if _PROMPTS_FILE.value:
        with open(_PROMPTS_FILE.value) as f:
            for line in f:
                line = line.rstrip("\n")
                if not line:
                    continue
                prompts.append(json.loads(line)["prompt"] if line.lstrip().startswith("{") else line)
    if not prompts:
        raise app.UsageError("give at least one --prompt or a --prompts_file")
    return prompts


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        distributed.initialize_from_flags()
    except distributed.DistributedError as e:
        sys.exit(f"error: {e}")
    logging.set_verbosity(logging.WARNING)
    import jax

    from free_transformer_jax.checkpoint import CheckpointError, load_model
    from free_transformer_jax.data import make_tokenizer
    from free_transformer_jax.generate import SamplingConfig, generate

    prompts = read_prompts()
    try:
        config, cfg, params, step = load_model(_WORKDIR.value, step=_STEP.value)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    tok = make_tokenizer(config)
    stop = []
    for s in _STOP.value:
        ids = tok.encode(s)
        if len(ids) != 1:
            sys.exit(f"error: --stop={s!r} is {len(ids)} tokens; each stop string must be one token")
        stop.append(ids[0])
    if not _STOP.value and tok.eos_id is not None:
        stop.append(tok.eos_id)
    try:
        sc = SamplingConfig(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                            top_k=_TOP_K.value, top_p=_TOP_P.value, stop_tokens=tuple(stop),
                            pad_id=tok.pad_id)
    except ValueError as e:
        sys.exit(f"error: {e}")
    bos = [tok.bos_id] if _BOS.value and tok.bos_id is not None else []
    rows, groups, meta = [], [], []
    for i, p in enumerate(prompts):
        ids = bos + tok.encode(p)
        for j in range(_NUM.value):
            rows.append(ids)
            groups.append(i if _Z.value == "shared" else len(rows) - 1)
            meta.append((i, j))
    out = generate(cfg, params, rows, sc, z_key=jax.random.key(_Z_SEED.value),
                   token_key=jax.random.key(_SEED.value), z_groups=groups)
    sink = open(_OUTPUT.value, "w") if _OUTPUT.value else None
    p_len = out["prompt_len"]
    for r, ((i, j), new) in enumerate(zip(meta, out["new_tokens"])):
        text = tok.decode([t for t in new if t not in stop])
        if sink:
            record = {"prompt": prompts[i], "prompt_index": i, "sample": j, "z": _Z.value,
                      "z_group": groups[r], "z_seed": _Z_SEED.value, "seed": _SEED.value,
                      "step": step, "text": text, "tokens": new,
                      "codes": out["codes"][r, p_len - len(rows[r]):p_len + len(new) - 1].tolist()}
            sink.write(json.dumps(record) + "\n")
        else:
            print(f"[prompt {i} sample {j} z-group {groups[r]}] {prompts[i]}{text}")
    if sink:
        sink.close()


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
