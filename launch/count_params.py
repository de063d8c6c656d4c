"""Prints parameter counts of a config, baseline vs Free Transformer (no memory is allocated).

    python launch/count_params.py --config=configs/8b.py
"""

from absl import flags
from ml_collections import config_flags

from common import run  # launch/common.py: one-line errors shared by the launchers

from free_transformer_jax.flops import param_counts
from free_transformer_jax.model.config import ModelConfig

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)


def main(argv):
    del argv
    cfg = ModelConfig.from_dict(_CONFIG.value.model)
    ft = param_counts(cfg.replace(latent=True))
    base = param_counts(cfg.replace(latent=False))
    m = lambda n: f"{n / 1e6:,.1f}M"
    print(f"baseline               {m(base['total'])}  (embedding {m(base['embedding'])}, "
          f"readout {m(base['readout'])})")
    print(f"free transformer       {m(ft['total'])}  (+{100 * (ft['total'] / base['total'] - 1):.2f}%)")
    print(f"  extra encoder block  {m(ft['encoder'])}  (zeta, block, norm, bit readout)")
    print(f"  post-sampler table   {m(ft['post_sampler'])}  (2**{cfg.latent_bits} x {cfg.d_model})")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    run(main)
