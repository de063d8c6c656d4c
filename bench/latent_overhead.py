"""Side-by-side cost of the latent path: baseline vs Free Transformer (fused custom_vjp) vs Free
Transformer (dense reference), same shared weights and batch, in one run. Prints step time and
compiled temporary memory per device, and ratios to the baseline.

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


def main(argv):
    del argv
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from free_transformer_jax.model.config import ModelConfig
    from free_transformer_jax.model.transformer import init_params
    from free_transformer_jax.train.state import TrainState
    from free_transformer_jax.train.step import make_train_step

    print(f"device: {jax.devices()[0].device_kind}, d_model {_D.value}, layers {_L.value}, "
          f"batch {_B.value} x {_T.value}, dtype {_DTYPE.value}, attention_chunk "
          f"{_CHUNK.value}, remat {_REMAT.value}")
    tokens = jax.random.randint(jax.random.key(0), (_B.value, _T.value + 1), 0, _V.value)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

    def measure(cfg):
        tx = optax.adamw(1e-4)
        params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
        step = jax.jit(make_train_step(cfg, tx, 0, 1), donate_argnums=(0,))
        compiled = step.lower(state, batch).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(_STEPS.value):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
        return (time.perf_counter() - t0) / _STEPS.value, temp

    base = ModelConfig(vocab_size=_V.value, d_model=_D.value, n_layers=_L.value, n_heads=4,
                       n_kv_heads=4, dtype=_DTYPE.value, latent=False,
                       attention_chunk=_CHUNK.value, remat_policy=_REMAT.value)
    t0, m0 = measure(base)
    print(f"{'variant':28s} {'step ms':>9s} {'x base':>7s} {'temp MiB':>9s} {'x base':>7s}")
    print(f"{'baseline':28s} {1e3 * t0:9.1f} {1.0:7.2f} {m0:9.1f} {1.0:7.2f}")
    for bits in map(int, _BITS.value):
        for impl in ("fused", "dense"):
            if impl == "dense" and bits > _DENSE_MAX.value:
                continue
            t, m = measure(base.replace(latent=True, latent_bits=bits, latent_impl=impl))
            print(f"{'free H=%d %s' % (bits, impl):28s} {1e3 * t:9.1f} {t / t0:7.2f} {m:9.1f} "
                  f"{m / m0:7.2f}")


if __name__ == "__main__":
    app.run(main)
