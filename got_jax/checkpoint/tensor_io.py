"""Streaming, torch-free access to checkpoint tensors.

* ``*.safetensors`` files are parsed directly (header + memory map), so bf16/fp16/fp32 tensors
  are read one at a time without torch and without loading the whole file.
* Sharded checkpoints are opened through their ``*.index.json`` (``weight_map``).
* PyTorch pickles (``pytorch_model*.bin``) are the one place torch is imported, lazily, with
  ``weights_only=True`` and ``mmap=True``.

Every reader is a :class:`TensorSource`: ``keys()``, ``shape(key)``, ``dtype(key)``, ``get(key)``
returning a numpy array (bf16 as ``ml_dtypes.bfloat16``) and ``where(key)`` naming the file.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import Callable, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from got_jax.checkpoint.errors import CheckpointError

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class TensorSource:
    """A read-only, lazily loaded mapping of tensor name -> numpy array."""

    def __init__(self, entries: Mapping[str, tuple[tuple[int, ...], np.dtype, str, Callable[[], np.ndarray]]],
                 description: str):
        self._entries = dict(entries)
        self.description = description

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[0]

    def dtype(self, key: str) -> np.dtype:
        return self._entry(key)[1]

    def where(self, key: str) -> str:
        return self._entry(key)[2]

    def get(self, key: str) -> np.ndarray:
        return self._entry(key)[3]()

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for k in self._entries:
            yield k, self.get(k)

    def _entry(self, key):
        try:
            return self._entries[key]
        except KeyError:
            raise CheckpointError(f"{self.description}: no tensor named {key!r}") from None

    @staticmethod
    def merge(sources: Iterable["TensorSource"], description: str) -> "TensorSource":
        entries: dict = {}
        for s in sources:
            for k in s.keys():
                if k in entries:
                    raise CheckpointError(f"{description}: tensor {k!r} appears in both "
                                          f"{entries[k][2]} and {s.where(k)}")
                entries[k] = s._entries[k]
        return TensorSource(entries, description)

    def with_prefix_stripped(self, prefix: str) -> "TensorSource":
        """The tensors whose name starts with ``prefix``, renamed without it."""
        return TensorSource({k[len(prefix):]: v for k, v in self._entries.items() if k.startswith(prefix)},
                            f"{self.description} [{prefix}*]")


def open_safetensors(path: str) -> TensorSource:
    """Opens one ``.safetensors`` file lazily (memory-mapped, torch-free)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"safetensors file not found: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file is {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    base = 8 + n
    entries = {}
    for key, info in header.items():
        dt = info.get("dtype")
        if dt not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dt!r}")
        dtype = np.dtype(_ST_DTYPES[dt])
        shape = tuple(int(s) for s in info["shape"])
        start, end = (int(o) for o in info["data_offsets"])
        if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {key!r} byte range {start}..{end} does not fit shape {shape} {dt}")
        if base + end > size:
            raise CheckpointError(f"{path}: truncated file: tensor {key!r} needs bytes up to {base + end}, "
                                  f"file has {size}")

        def load(start=start, shape=shape, dtype=dtype):
            count = int(np.prod(shape, dtype=np.int64))
            if count == 0:
                return np.zeros(shape, dtype)
            mm = np.memmap(path, dtype=np.uint8, mode="r", offset=base + start, shape=(count * dtype.itemsize,))
            return np.array(mm.view(dtype).reshape(shape))

        entries[key] = (shape, dtype, path, load)
    return TensorSource(entries, path)


def _torch_to_numpy(t) -> np.ndarray:
    import torch  # noqa: PLC0415  (torch is needed only for .bin pickles)

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


def open_bin(path: str) -> TensorSource:
    """Opens a PyTorch ``.bin`` state dict (``weights_only=True``, memory-mapped when possible)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"PyTorch checkpoint file not found: {path}")
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        raise CheckpointError(f"{path}: reading .bin checkpoints needs torch (pip install torch)") from None
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # noqa: BLE001  (torch raises many kinds for a damaged pickle)
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(sd).__name__}")
    entries = {}
    np_dtypes = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16,
                 torch.float64: np.float64, torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_,
                 torch.uint8: np.uint8, torch.int8: np.int8}
    for k, t in sd.items():
        if not hasattr(t, "shape"):
            raise CheckpointError(f"{path}: entry {k!r} is not a tensor ({type(t).__name__})")
        if t.dtype not in np_dtypes:
            raise CheckpointError(f"{path}: tensor {k!r} has unsupported dtype {t.dtype}")
        entries[k] = (tuple(t.shape), np.dtype(np_dtypes[t.dtype]), path, lambda t=t: _torch_to_numpy(t))
    return TensorSource(entries, path)


def _open_file(path: str) -> TensorSource:
    if path.endswith(".safetensors"):
        return open_safetensors(path)
    if path.endswith(".bin") or path.endswith(".pt") or path.endswith(".pth"):
        return open_bin(path)
    raise CheckpointError(f"{path}: unknown checkpoint file type (expected .safetensors or .bin)")


def open_index(index_path: str) -> TensorSource:
    """Opens a sharded checkpoint through its ``*.index.json`` (weight_map: key -> shard file)."""
    try:
        with open(index_path) as f:
            index = json.load(f)
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{index_path}: unreadable checkpoint index ({type(e).__name__}: {e})") from None
    folder = os.path.dirname(index_path)
    shards = sorted(set(weight_map.values()))
    for s in shards:
        if not os.path.isfile(os.path.join(folder, s)):
            raise CheckpointError(f"{index_path}: names shard {s!r}, which is missing from {folder}")
    merged = TensorSource.merge([_open_file(os.path.join(folder, s)) for s in shards], index_path)
    listed, found = set(weight_map), set(merged.keys())
    if listed - found:
        k = sorted(listed - found)[0]
        raise CheckpointError(f"{index_path}: key {k!r} is listed for shard {weight_map[k]!r} but not found there "
                              f"({len(listed - found)} such keys)")
    if found - listed:
        k = sorted(found - listed)[0]
        raise CheckpointError(f"{index_path}: shard {merged.where(k)} holds {k!r}, which the index does not list")
    return merged


def open_tensor_folder(folder: str, stems: Iterable[str] = ("model", "diffusion_pytorch_model", "pytorch_model"),
                       variant: str | None = None) -> TensorSource:
    """Opens the weights in ``folder``: a single file or a sharded set with its index.

    Safetensors are preferred over ``.bin``. ``variant`` (e.g. ``"fp16"``) selects
    ``<stem>.<variant>.safetensors`` files.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"not a checkpoint folder: {folder}")
    suffix = f".{variant}" if variant else ""
    for stem in stems:
        for ext in (".safetensors", ".bin"):
            single = os.path.join(folder, f"{stem}{suffix}{ext}")
            index = os.path.join(folder, f"{stem}{suffix}{ext}.index.json")
            if os.path.isfile(index):
                return open_index(index)
            if os.path.isfile(single):
                return _open_file(single)
    present = sorted(os.listdir(folder))
    raise CheckpointError(f"{folder}: no weights found (looked for {list(stems)} with variant={variant!r} as "
                          f".safetensors / .bin, single or with .index.json); folder holds {present[:20]}")


def write_safetensors(path: str, tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes tensors to ``path`` atomically (temp file + rename), one tensor at a time.

    ``tensors`` may be a mapping or an iterable of ``(name, array-or-callable)``; a callable is
    called only when its tensor is written, so peak memory stays near the largest tensor.
    """
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    header: dict = {}
    offset = 0
    metas = []
    for name, arr in items:
        shape, dtype = (arr.shape, arr.dtype) if not callable(arr) else arr.meta  # type: ignore[attr-defined]
        dtype = np.dtype(dtype)
        if dtype not in _ST_NAMES:
            raise CheckpointError(f"{path}: cannot store tensor {name!r} of dtype {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        metas.append((name, arr, shape, dtype, nbytes))
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, arr, shape, dtype, nbytes in metas:
                a = np.ascontiguousarray(arr() if callable(arr) else arr)
                if a.shape != tuple(shape) or a.dtype != dtype:
                    raise CheckpointError(f"{path}: tensor {name!r} is {a.shape} {a.dtype}, declared {shape} {dtype}")
                f.write(a.tobytes())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
