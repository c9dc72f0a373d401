"""got-jax: GoT (Generation Chain-of-Thought) in JAX/Flax NNX."""
import setuptools

setuptools.setup(
    name="got_jax",
    version="0.1.0",
    description="GoT (Generation Chain-of-Thought) reimplemented in JAX/Flax NNX for TPU.",
    # configs/ is installed too, so `from configs.data_got import ...` and sample.py's configs work from any
    # directory; the converters are got_jax.convert.* (convert/*.py in the repository are thin scripts).
    packages=setuptools.find_packages(include=["got_jax", "got_jax.*", "configs"]),
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
        "scipy",  # got_jax.eval.detect (connected components)
        "tqdm",
        "absl-py",
    ],
    entry_points={
        "console_scripts": [
            "got-jax-convert-got=got_jax.convert.got_checkpoint:main",
            "got-jax-convert-qwen=got_jax.convert.qwen2_5_vl:main",
            "got-jax-convert-sdxl=got_jax.convert.sdxl:main",
            "got-jax-export-pytorch=got_jax.convert.export_pytorch:main",
        ],
    },
    extras_require={
        # reading GoT-6B's pytorch_model*.bin pickles (and writing --format got_bin) needs torch;
        # safetensors folders (Qwen2.5-VL, SDXL) convert without it
        "convert": ["torch"],
        # notebooks/quickstart.ipynb's optional interactive box editing (an anywidget widget: works in Colab,
        # JupyterLab and Notebook 7; see got_jax/sampling/widget.py for the choice)
        "notebook": ["jupyter-bbox-widget==0.7.0", "ipywidgets>=8"],
        "test": [
            "pytest",
            "pytest-xdist",  # pytest.ini: -n 2 --dist loadfile (one worker per CI core; a test file and its module fixtures stay on one worker)
            "torch==2.13.0",
            "diffusers",
            "hypothesis",
            "peft",  # the PEFT LoRA reference (train step parity, adapter export)
            "nbformat",  # tests/test_notebooks.py: notebooks valid, quickstart executed headless
            "nbclient",
            "ipykernel",
        ],
    },
)
