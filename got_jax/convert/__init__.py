"""Converters between the released PyTorch checkpoints and got-jax's Orbax folders.

Run them from any directory after ``pip install -e .``::

    python -m got_jax.convert.got_checkpoint --help      # or: got-jax-convert-got --help
    python -m got_jax.convert.qwen2_5_vl --help          #     got-jax-convert-qwen
    python -m got_jax.convert.sdxl --help                #     got-jax-convert-sdxl
    python -m got_jax.convert.export_pytorch --help      #     got-jax-export-pytorch

``convert/*.py`` in the repository are thin scripts over these modules (``python convert/sdxl.py``).
"""
