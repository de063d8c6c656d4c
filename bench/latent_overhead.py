"""Side-by-side cost of the latent path: baseline vs Free Transformer (fused custom_vjp) vs Free
Transformer (dense reference), same shared weights and batch, in one run. Prints step time and
compiled temporary memory per device, and ratios to the baseline. Each variant is the training
program ``train()`` would run (``train.program.build_program``) on all local devices.

    python bench/latent_overhead.py --d_model=256 --n_layers=4 --seq_len=256 --batch=8 --bits=8,12,16
"""

import time

from absl import app, flags

_D = flags.DEFINE_integer("d_model", 256, "")
_L = flags.DEFINE_integer("n_layers", 4, "")
_V = flags.DEFINE_integer("vocab", 4096, "")
_T = flags.DEFINE_integer("seq_len", 256, "")
_B = flags.DEFINE_integer("batch", 8, "")
_BITS = flags.DEFINE_list("bits", ["8", "12", "16"], "Latent bits H to try.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per variant (after one warm-up).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")
_DENSE_MAX = flags.DEFINE_integer("dense_max_bits", 16, "Skip the dense form above this H.")
_CHUNK = flags.DEFINE_integer("attention_chunk", 0, "model.attention_chunk for every variant.")
_REMAT = flags.DEFINE_string("remat", "none", "model.remat_policy for every variant.")


def experiment(**model):
    """The base config with this bench's shape: one training program per variant."""
    from free_transformer_jax.configlib import base_config

    c = base_config()
    c.model.update({**dict(vocab_size=_V.value, d_model=_D.value, n_layers=_L.value, n_heads=4,
                           n_kv_heads=4, dtype=_DTYPE.value, latent=False,
                           attention_chunk=_CHUNK.value, remat_policy=_REMAT.value), **model})
    c.data.seq_len = _T.value
    c.train.batch_size = _B.value
    c.train.steps = 1 + _STEPS.value
    return c


def main(argv):
    del argv
    import jax
    import numpy as np

    from free_transformer_jax import sharding as shard_lib
    from free_transformer_jax.train.program import build_program

    print(f"device: {jax.devices()[0].device_kind}, d_model {_D.value}, layers {_L.value}, "
          f"batch {_B.value} x {_T.value}, dtype {_DTYPE.value}, attention_chunk "
          f"{_CHUNK.value}, remat {_REMAT.value}")
    b, t = _B.value, _T.value
    tokens = np.random.default_rng(0).integers(0, _V.value, (b, t + 1)).astype(np.int32)
    host_batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                  "segment_ids": np.ones((b, t), np.int32),
                  "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
                  "loss_mask": np.ones((b, t), np.int32)}

    def measure(config):
        """(seconds per step, compiled temporary MiB per device) of the training program."""
        program = build_program(config)  # what train() runs: same optimizer, shardings, step
        compiled = program.lower().compile()
        temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
        state = program.init_state(seed=0)
        batch = shard_lib.global_batch_from_host(host_batch, program.mesh)
        with shard_lib.mesh_context(program.mesh):
            state, m = compiled(state, batch)
            jax.block_until_ready(m)
            t0 = time.perf_counter()
            for _ in range(_STEPS.value):
                state, m = compiled(state, batch)
            jax.block_until_ready(m)
        return (time.perf_counter() - t0) / _STEPS.value, temp

    t0, m0 = measure(experiment())
    print(f"{'variant':28s} {'step ms':>9s} {'x base':>7s} {'temp MiB':>9s} {'x base':>7s}")
    print(f"{'baseline':28s} {1e3 * t0:9.1f} {1.0:7.2f} {m0:9.1f} {1.0:7.2f}")
    for bits in map(int, _BITS.value):
        for impl in ("fused", "dense"):
            if impl == "dense" and bits > _DENSE_MAX.value:
                continue
            t, m = measure(experiment(latent=True, latent_bits=bits, latent_impl=impl))
            print(f"{'free H=%d %s' % (bits, impl):28s} {1e3 * t:9.1f} {t / t0:7.2f} {m:9.1f} "
                  f"{m / m0:7.2f}")


if __name__ == "__main__":
    app.run(main)
