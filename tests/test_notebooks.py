"""notebooks/: valid nbformat, every code cell compiles, the got-jax functions they call exist, take the arguments
given and are tested elsewhere in tests/; quickstart.ipynb runs headless top to bottom (nbclient, fresh kernel,
time limit). tpu_colab.ipynb needs a TPU runtime and the released weights, so it is only checked statically."""

import ast
import importlib
import inspect
import os
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("quickstart", "tpu_colab")
# instances the notebooks call: their class's method (the call's arguments are checked against it)
INSTANCES = {"pipe": ("got_jax.got.pipeline", "GoTPipeline.__call__")}


def _read(name):
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    return nb


def _python(cell_source: str) -> str:
    """A code cell without its shell / magic lines (``!pip ...``, ``%time``), which are not Python."""
    return "\n".join("" if ln.lstrip().startswith(("!", "%")) else ln for ln in cell_source.splitlines())


def _code(name) -> str:
    return "\n\n".join(_python(c.source) for c in _read(name).cells if c.cell_type == "code")


def _tested_names() -> str:
    return "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_notebooks.py")


def _resolve(node, names):
    """The object a Name / Attribute chain refers to, when its root is a got-jax / configs import."""
    chain = []
    while isinstance(node, ast.Attribute):
        chain.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in names:
        return None
    obj = names[node.id]
    for attr in reversed(chain):
        obj = getattr(obj, attr)  # AttributeError: the notebook uses something that does not exist
    return obj


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_valid_and_every_code_cell_compiles(name):
    nb = _read(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 5
    for i, c in enumerate(code):
        compile(_python(c.source), f"{name}.ipynb cell {i}", "exec")
    text = "\n".join(c.source for c in nb.cells)
    assert f"https://colab.research.google.com/github/got-jax/got-jax/blob/main/notebooks/{name}.ipynb" in text


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_calls_exist_take_their_arguments_and_are_tested(name):
    tree = ast.parse(_code(name))
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("got_jax", "configs"):
            mod = importlib.import_module(node.module)
            for a in node.names:
                names[a.asname or a.name] = getattr(mod, a.name)  # AttributeError: no such function
    for var, (mod, attr) in INSTANCES.items():
        obj = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
        names[var] = obj
    assert names, name
    tested, checked = _tested_names(), []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        obj = _resolve(node.func, names)
        if obj is None or not callable(obj):
            continue
        qual = getattr(obj, "__qualname__", "")
        short = qual.split(".")[-1] if qual != "GoTPipeline.__call__" else "GoTPipeline"
        assert re.search(rf"\b{re.escape(short)}\b", tested), f"{name}.ipynb calls {qual}, which no test calls"
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            checked.append(qual)  # *args / **kwargs: the signature cannot be checked statically
            continue
        sig = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
        args = [None] * (len(node.args) + (1 if inspect.isclass(obj) or qual.endswith("__call__") else 0))
        sig.bind_partial(*args, **{k.arg: None for k in node.keywords})  # TypeError: wrong arguments
        checked.append(qual)
    assert len(checked) >= 4, checked


@pytest.mark.slow
def test_quickstart_runs_headless(tmp_path):
    """Every cell of quickstart.ipynb in a fresh kernel (cwd: a temp folder), no cell error, within the limit;
    the T2I cell shows an image and the plan-edit cell paints the moved, recoloured box."""
    from nbclient import NotebookClient

    nb = _read("quickstart")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    os.environ.update(env)  # the kernel inherits this process's environment
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    t = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    seconds = time.perf_counter() - t
    assert seconds < 900, seconds
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 5, len(images)
    edit_cell = next(c for c in nb.cells if c.cell_type == "code" and "replace_boxes(plan, [moved]" in c.source)
    printed = "".join(o.get("text", "") for o in edit_cell.outputs if o.output_type == "stream")
    assert "color='green'" in printed, printed
    print(f"quickstart.ipynb: {seconds:.0f} s ({sys.platform})")
