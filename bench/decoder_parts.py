"""Forward + backward time of one decoder part at the CPU bench shape (configs/bench_cpu.py: 8 x 512
tokens, d_model 512, SwiGLU 1408, 8 query / 2 kv heads of 64), written three ways side by side:
autodiff of the plain formula (what the model used before model/fused.py), the project's
written-out backward (model/fused.py), and PyTorch when it is installed.

    python bench/decoder_parts.py [--repeats=7] [--attention_blocks=64,512] [--matmuls]

Prints the median milliseconds of each, and each one's time relative to the autodiff form. The
numbers locate where a train step's time goes; bench/step_time.py measures whole steps.
"""

from __future__ import annotations

import time

from absl import app, flags

_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per case (median reported).")
_BLOCKS = flags.DEFINE_list("attention_blocks", ["64"],
                            "Queries per block of the blocked attention cases, one case per value "
                            "(64: what config.attention_block picks at T = 512).")
_MATMULS = flags.DEFINE_bool("matmuls", False,
                             "Also time the SwiGLU's matmul shapes alone (tokens x features times "
                             "a weight, and the weight gradients' contraction over the tokens), in "
                             "JAX and in PyTorch.")
B, T, D, F, KV, G, HD = 8, 512, 512, 1408, 2, 4, 64


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def jax_cases(repeats: int, blocks: list[int]) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    from free_transformer_jax.model.fused import blocked_attention, swiglu
    from free_transformer_jax.model.layers import dot_product_attention

    keys = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(keys[0], (B, T, D))
    w = [jax.random.normal(k, s) * 0.02 for k, s in zip(keys[1:4], [(D, F), (D, F), (F, D)])]
    plain = lambda x, a, b, c: (jax.nn.silu(x @ a) * (x @ b)) @ c
    q = jax.random.normal(keys[4], (B, T, KV, G, HD))
    k = jax.random.normal(keys[5], (B, T, KV, HD))
    v = jax.random.normal(keys[6], (B, T, KV, HD))
    seg = jnp.ones((B, T), jnp.int32)
    out = {}

    def time_grad(name, fn, args):
        g = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=tuple(range(len(args)))))
        out[name] = _median_ms(lambda: jax.block_until_ready(g(*args)), repeats)

    time_grad("swiglu: autodiff", plain, (x, *w))
    time_grad("swiglu: fused.swiglu", swiglu, (x, *w))
    for causal in (True, False):
        kind = "causal" if causal else "full"
        dense = lambda q, k, v, c=causal: dot_product_attention(q, k, v, seg, jnp.arange(T), seg,
                                                                c, jnp.float32)
        time_grad(f"attention {kind}: autodiff (xla)", dense, (q, k, v))
        for block in blocks:
            blocked = lambda q, k, v, c=causal, n=block: blocked_attention(q, k, v, seg, c, n)
            time_grad(f"attention {kind}: blocked, {block} queries", blocked, (q, k, v))
    return out


def torch_cases(repeats: int) -> dict[str, float]:
    try:
        import torch
    except ImportError:
        return {}
    x = torch.randn(B, T, D, requires_grad=True)
    w = [(torch.randn(*s) * 0.02).requires_grad_() for s in [(D, F), (D, F), (F, D)]]
    q = torch.randn(B, KV * G, T, HD, requires_grad=True)
    k = torch.randn(B, KV, T, HD, requires_grad=True)
    v = torch.randn(B, KV, T, HD, requires_grad=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    mlp = lambda: ((torch.nn.functional.silu(x @ w[0]) * (x @ w[1])) @ w[2]).pow(2).sum().backward()
    out = {"swiglu: pytorch": _median_ms(mlp, repeats)}
    for causal in (True, False):
        attn = lambda c=causal: sdpa(q, k, v, is_causal=c, enable_gqa=True).pow(2).sum().backward()
        out[f"attention {'causal' if causal else 'full'}: pytorch sdpa"] = _median_ms(attn, repeats)
    return out


def matmul_cases(repeats: int) -> dict[str, float]:
    """One (B*T) x D x F matmul per layout the SwiGLU's forward and backward use, each alone."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[0], (B, T, D))
    h = jax.random.normal(keys[1], (B, T, F))
    w_df = jax.random.normal(keys[2], (D, F))
    w_fd = jax.random.normal(keys[3], (F, D))
    cases = {"x @ W (tokens x D x F)": ("btd,df->btf", x, w_df),
             "h @ W (tokens x F x D)": ("btf,fd->btd", h, w_fd),
             "x^T h (weight gradient, D x tokens x F)": ("btd,btf->df", x, h),
             "h^T x (weight gradient, F x tokens x D)": ("btf,btd->fd", h, x)}
    out = {}
    for name, (spec, a, b) in cases.items():
        fn = jax.jit(lambda a, b, s=spec: jnp.einsum(s, a, b))
        out[f"{name}: jax"] = _median_ms(lambda: jax.block_until_ready(fn(a, b)), repeats)
    try:
        import torch
    except ImportError:
        return out
    xt, ht = torch.randn(B * T, D), torch.randn(B * T, F)
    wt_df, wt_fd = torch.randn(D, F), torch.randn(F, D)
    same_order = [lambda: xt @ wt_df, lambda: ht @ wt_fd, lambda: xt.t() @ ht, lambda: ht.t() @ xt]
    for name, fn in zip(cases, same_order):
        out[f"{name}: pytorch"] = _median_ms(fn, repeats)
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        blocks = [int(b) for b in _BLOCKS.value]
    except ValueError:
        raise app.UsageError(f"--attention_blocks={','.join(_BLOCKS.value)}: give whole numbers "
                             "of queries, e.g. --attention_blocks=64,512") from None
    if any(not 0 < b <= T for b in blocks):
        raise app.UsageError(f"--attention_blocks={','.join(_BLOCKS.value)}: each must be in "
                             f"1 .. {T} (the bench's sequence length)")
    times = {**jax_cases(_REPEATS.value, blocks), **torch_cases(_REPEATS.value)}
    print(f"forward + backward, {B} x {T} tokens, median of {_REPEATS.value}:")
    for name, ms in times.items():
        part = name.split(":")[0]
        ref = times[next(n for n in times if n.startswith(part + ":") and "autodiff" in n)]
        print(f"  {name:40s} {ms:8.1f} ms   {ms / ref:5.2f}x of autodiff")
    if _MATMULS.value:
        flop = 2 * B * T * D * F
        print(f"the SwiGLU's matmuls alone ({flop / 1e9:.2f} GFLOP each), median of "
              f"{_REPEATS.value}:")
        for name, ms in matmul_cases(_REPEATS.value).items():
            print(f"  {name:55s} {ms:7.1f} ms   {flop / ms / 1e6:6.1f} GFLOP/s")


if __name__ == "__main__":
    app.run(main)
