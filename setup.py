"""got-jax: GoT (Generation Chain-of-Thought) in JAX/Flax NNX."""
import setuptools

setuptools.setup(
    name="got_jax",
    version="0.1.0",
    description="GoT (Generation Chain-of-Thought) reimplemented in JAX/Flax NNX for TPU.",
    packages=setuptools.find_packages(include=["got_jax", "got_jax.*"]),
    package_data={"got_jax": ["assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=[
        "jax",
        "flax",
        "optax",
        "orbax-checkpoint",
        "grain",
        "array-record",
        "tensorflow-datasets",
        "ml-collections",
        "clu",
        "tensorflow-cpu",
        "tensorboard",
        "transformers",
        "tokenizers",
        "jinja2",  # transformers' apply_chat_template (the GoT prompts)
        "safetensors",
        "ml_dtypes",
        "pyarrow",
        "pillow",
        "numpy",
        "tqdm",
        "absl-py",
    ],
    extras_require={
        "test": [
            "pytest",
            "torch==2.13.0",
            "diffusers",
            "hypothesis",
        ],
    },
)
