"""free_transformer_jax: the Free Transformer (Fleuret, arXiv 2510.17558) in JAX/Flax.

Ranges here say what the code is written against; requirements.lock pins the exact runtime set and
requirements-test.lock adds the test-only packages (CI installs the latter). pyproject.toml only
declares the build system (setuptools); the metadata stays here.
"""

from setuptools import find_packages, setup

setup(
    name="free_transformer_jax",
    version="0.1.0",
    description="The Free Transformer (a decoder conditioned on a random latent) in JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=["free_transformer_jax", "free_transformer_jax.*"]),
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "tensorflow-datasets>=4.9.10,<5",
        "importlib_resources>=6",  # tensorflow-datasets needs it without declaring it
        "array_record>=0.8",
        "absl-py>=2.1",
        "ml-collections>=1.1,<2",
        "numpy>=2",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        # HF parity tests use torch (CPU) and transformers as the reference implementation.
        "test": ["pytest>=8", "torch>=2.13", "transformers>=5"],
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        "gpu": ["jax[cuda12]>=0.10.2,<0.11"],
        # gs:// work directories and data: etils epath serves them through fsspec's gcsfs
        "gcs": ["gcsfs>=2024.2"],
    },
)
