"""The README as written: its shell commands and Python snippets, run from a folder outside the repository.

The fenced ```bash and ```python blocks of README.md are parsed here, so a README change changes this
test. Only paths and sizes are substituted: ``/ckpt/...`` and ``/data/...`` become folders under a temp
directory holding tiny stand-ins in the released layouts (a Qwen2.5-VL folder saved by transformers with
its tokenizer, a diffusers SDXL folder with fp16 variants, a GoT-6B ``pytorch_model.bin`` with PEFT LoRA
keys; the GoT annotation folders as the builders read them), ``sample.py`` becomes its path in this
checkout, and image sizes / step / token counts shrink. Each command runs through ``bash`` with the usual
umask, in that outside folder, with ``PYTHONPATH`` at this checkout (what ``pip install -e .`` gives).
A command that fails, or a README command this test does not know how to run, fails the test.
Environment set-up (``python3 -m venv``, ``. .venv/bin/activate``, ``pip install``) and the test-suite
command itself are the only segments not run; :func:`test_installed_package_runs_from_anywhere` checks
the installed package instead.
"""

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpu_env import LLVM_O0, NO_YNN, xla_flags

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# segments of the README's one-liners that set up the environment (replaced by PYTHONPATH here) or run this suite
SETUP = {"python3 -m venv .venv", ". .venv/bin/activate", "pip install -e .", 'pip install -q -e ".[test]"'}
SUITE = {"python -m pytest -q"}
SIZE = 64  # image side for the stand-ins (a multiple of 32)
SAMPLE_SIZES = {"height": SIZE, "width": SIZE, "num_inference_steps": 2, "max_new_tokens": 12}
EVAL_SIZES = {"prompts_per_task": 1, "images_per_prompt": 1, "steps": 2, "max_new_tokens": 8, "batch_size": 2,
              "size": 32}
DEMO_PATHS = ("/runs/demo_", "/data/shapes64")  # the shipped demo's reproduction commands
SHAPES_CKPT = "shapes-got"  # /ckpt/shapes-got of the README's eval command: a tiny random-weight converted folder
REAL_SOURCES = {  # the real GoT annotation folders of the README -> (builder config, rows in their field names)
    "LAHR-GoT": "laion_aesthetics_got", "JourneyDB-GoT": "journeydb_got", "FLUX-GoT": "flux_got",
    "OmniEdit-GoT": "omniedit_got", "SEED-Edit-GoT": "seed_edit_multiturn_got",
}

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("readme")]  # one worker: one module fixture


# ------------------------------------------------------------------------------------ README parsing


def fenced_blocks(lang: str, text: str | None = None) -> list[str]:
    """The bodies of the ```lang fenced blocks of the README, in order."""
    text = README.read_text() if text is None else text
    return [m.group(1) for m in re.finditer(rf"^```{lang}[ \t]*\n(.*?)^```[ \t]*$", text, re.S | re.M)]


def shell_commands(block: str) -> list[str]:
    """Commands of a bash block: backslash continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", block)
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def readme_commands() -> list[str]:
    """Every README shell command to run, one-liners split at ``&&`` minus the environment set-up."""
    out = []
    for block in fenced_blocks("bash"):
        for cmd in shell_commands(block):
            for seg in (s.strip() for s in cmd.split("&&")):
                if seg not in SETUP and seg not in SUITE:
                    out.append(seg)
    return out


def group_of(cmd: str) -> str:
    if "train.py" in cmd and ("gcloud " in cmd or "--coordinator_address" in cmd):
        return "pod"  # launch lines for pods / several processes: checked, not run
    if any(p in cmd for p in DEMO_PATHS):
        return "demo"  # how the shipped demo was made (45 min): checked, not run (tests/test_demo_stages.py runs it small)
    for key, group in (("train.py", "train"), ("got_jax.eval.sheet", "sheet"),
                       ("got_jax.train.export", "export"), ("got_jax.convert", "convert"), ("sample.py", "sample"),
                       ("got_jax.data", "data"), ("got_jax.eval", "eval")):
        if key in cmd:
            return group
    raise AssertionError(f"README command not covered by tests/test_readme.py: {cmd!r}")


def test_readme_parsing_covers_every_block():
    """Every command of every bash block is run by one of the tests below (nothing silently skipped)."""
    cmds = readme_commands()
    groups = [group_of(c) for c in cmds]  # raises on an unknown command
    assert {"convert", "sample", "data", "train", "export", "pod", "eval"} <= set(groups)
    assert len(cmds) >= 15
    for code in fenced_blocks("python"):
        compile(code, "README.md", "exec")  # every snippet is valid Python as written
        assert snippet_kind(code) in ("api", "data")
    # the parser itself: continuations, comments and fences
    demo = "x\n```bash\n# c\na --b \\\n    --c\n```\n```python\nprint(1)\n```\n"
    assert [shell_commands(b) for b in fenced_blocks("bash", demo)] == [["a --b --c"]]
    assert fenced_blocks("python", demo) == ["print(1)\n"]


# ------------------------------------------------------------------------------------ substitutions


def substitute(cmd: str, work: Path) -> str:
    """Paths and sizes only (see the module docstring)."""
    if group_of(cmd) in ("pod", "demo"):  # checked, not run (test_pod_commands_..., test_demo_commands_...)
        return ":"
    cmd = cmd.replace("/ckpt/", f"{work}/ckpt/").replace("/data/", f"{work}/data/").replace("/runs/", f"{work}/runs/")
    for script in ("train.py", "configs/"):  # repository paths, as run from the repository root
        cmd = re.sub(rf"(^|\s){script}", rf"\g<1>{shlex.quote(str(ROOT) + '/' + script)}", cmd)
    cmd = re.sub(r"(^|\s)python(\s)", rf"\g<1>{shlex.quote(sys.executable)}\g<2>", cmd)
    if "sample.py" in cmd:
        cmd = cmd.replace(" sample.py ", f" {shlex.quote(str(ROOT / 'sample.py'))} ")
        for field, value in SAMPLE_SIZES.items():
            if f"--config.{field}=" in cmd:
                cmd = re.sub(rf"--config\.{field}=\S+", f"--config.{field}={value}", cmd)
            else:
                cmd += f" --config.{field}={value}"
    if "train.py" in cmd or "got_jax.train" in cmd:  # the 6 shapes rows: 4 to train on, 2 held out
        cmd += "".join(f" --config.{k}={v}" for k, v in TRAIN_SIZES.items())
    if "got_jax.eval.sheet" in cmd:  # one prompt per task, few steps / tokens
        return re.sub(r" --(per_task|steps|max_new_tokens) \S+", "", cmd) + " --per_task 1 --steps 2 --max_new_tokens 12"
    if "got_jax.eval" in cmd:  # one prompt per task, one image, few steps / tokens
        for flag, value in EVAL_SIZES.items():
            cmd = re.sub(rf" --{flag} \S+", "", cmd) + f" --{flag} {value}"
    cmd = re.sub(r"--num-generation \d+", "--num-generation 6", cmd)
    cmd = re.sub(r"--num-editing \d+", "--num-editing 3", cmd)
    cmd = re.sub(r"--size \d+", "--size 32", cmd)
    return cmd


def snippet_kind(code: str) -> str:
    return "api" if "GoTPipeline" in code else "data" if "make_dataset" in code else "unknown"


TRAIN_SIZES = {"total_steps": 3, "global_batch_size": 2, "eval_examples": 2, "data.num_shards": 1}
PYTHON_SIZES = {"api": {"height=1024, width=1024, num_inference_steps=50": f"height={SIZE}, width={SIZE}, "
                                                                           "num_inference_steps=2"},
                "data": {"batch_size=8": "batch_size=2"}}


def substitute_python(code: str, work: Path) -> str:
    code = code.replace('"/ckpt/', f'"{work}/ckpt/').replace('"/data/', f'"{work}/data/')
    for old, new in PYTHON_SIZES[snippet_kind(code)].items():  # a README edit here must update this test
        assert old in code, f"README snippet no longer sets {old!r}: update PYTHON_SIZES in tests/test_readme.py"
        code = code.replace(old, new)
    return code


def env() -> dict:
    e = dict(os.environ)
    e.update(PYTHONPATH=str(ROOT), XLA_FLAGS=xla_flags(2, LLVM_O0, NO_YNN), JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="3", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return e


@dataclasses.dataclass
class Step:
    """One README command (or Python snippet, run as ``python snippet.py``) with what it writes and needs."""

    group: str
    readme: str  # as written in the README
    cmd: str  # as run
    cwd: Path
    writes: str | None = None
    code: str = ""  # a snippet's substituted source
    deps: list = dataclasses.field(default_factory=list)
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0

    def check(self) -> "Step":
        assert self.rc == 0, (f"README {self.group} command failed (rc {self.rc}): {self.readme}\n"
                              f"{self.stdout[-2000:]}\n{self.stderr[-4000:]}")
        return self


def _writes(cmd: str) -> str | None:
    m = re.search(r"--(?:out|outdir|data_dir) (\S+)", cmd) or re.search(r"--workdir (\S+)", cmd)
    return m.group(1) if m else None


def _uses(st: "Step", path: str) -> bool:
    """Whether step ``st`` names ``path`` or something under it: a shell word of a command (besides its own
    output), or a quoted absolute path in a snippet."""
    if st.group.startswith("python"):
        return path.startswith("/") and re.search(rf"[\"']{re.escape(path)}(/|[\"'])", st.code) is not None
    words = shlex.split(st.cmd)
    for flag in ("--out", "--outdir", "--data_dir", "--workdir"):
        if flag in words and flag == "--workdir" and st.group == "export":
            continue  # the export reads the run's workdir
        if flag in words:
            del words[words.index(flag): words.index(flag) + 2]
    return any(re.search(rf"(^|[=:]){re.escape(path)}(/|$)", w) for w in words)  # also --x=PATH, file:PATH


ORDER = ("convert", "data", "train", "export", "sample", "eval", "sheet", "python_api", "python_data", "pod", "demo")  # dependencies first


def plan_steps(work: Path, run_dir: Path) -> list[Step]:
    """Every README command and snippet, each depending on the earlier steps that write a path it names
    (or the same output: those run one after the other)."""
    steps = [Step(group_of(c), c, substitute(c, work), run_dir) for c in readme_commands()]
    for code in fenced_blocks("python"):
        kind = snippet_kind(code)
        d = work / f"snippet_{kind}"
        d.mkdir()
        src = substitute_python(code, work)
        (d / "snippet.py").write_text(src)
        steps.append(Step(f"python_{kind}", code, f"{shlex.quote(sys.executable)} snippet.py", d, code=src))
    steps.sort(key=lambda st: ORDER.index(st.group))  # stable: README order within a group
    for i, st in enumerate(steps):
        st.writes = _writes(st.cmd)
        st.deps = [e for e in steps[:i] if e.writes and (_uses(st, e.writes) or e.writes == st.writes)]
    return steps


def run_steps(steps: list[Step], logs: Path, workers: int = 2, timeout: float = 1200) -> None:
    """Runs the steps as ``workers`` processes at a time (XLA compiles on one core each), each once its
    dependencies succeeded; a step whose dependency failed is not run (rc -1)."""
    logs.mkdir(exist_ok=True)
    pending, running = list(steps), {}
    while pending or running:
        for st in list(pending):
            if len(running) >= workers:
                break
            if any(d.rc is None for d in st.deps):
                continue
            pending.remove(st)
            if any(d.rc != 0 for d in st.deps):
                st.rc, st.stderr = -1, "not run: a step it depends on failed"
                continue
            i = steps.index(st)
            out, err = open(logs / f"{i}.out", "w"), open(logs / f"{i}.err", "w")
            proc = subprocess.Popen(["bash", "-c", f"umask 022 && {st.cmd}"], cwd=st.cwd, env=env(), stdout=out,
                                    stderr=err, text=True)
            running[i] = (st, proc, time.perf_counter(), out, err)
        for i, (st, proc, t0, out, err) in list(running.items()):
            if proc.poll() is None and time.perf_counter() - t0 < timeout:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()
            err.close()
            st.rc, st.seconds = proc.returncode, time.perf_counter() - t0
            st.stdout, st.stderr = (logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text()
            del running[i]
        time.sleep(0.2)


# ------------------------------------------------------------------------------------ stand-ins


def write_sources(data: Path) -> dict[str, int]:
    """Tiny annotation folders for the real GoT sources, in their field names; returns rows per folder."""
    from got_jax.data import shapes

    rows = {}
    for folder, config in REAL_SOURCES.items():
        d = data / folder
        (d / "annotations").mkdir(parents=True)
        (d / "img").mkdir()
        ann, table = [], []
        for i in range(2):
            if config in ("omniedit_got", "seed_edit_multiturn_got"):
                ex = shapes.editing_example(0, i, 32)
                Image.fromarray(ex["source_image"]).save(d / "img" / f"{i}_s.png")
                Image.fromarray(ex["target_image"]).save(d / "img" / f"{i}_t.png")
                if config == "omniedit_got":  # images joined by omni_edit_id from image_table/*.parquet
                    ann.append({"omni_edit_id": f"e{i}", "edited_prompt_list": ex["instruction"], "got": ex["got"]})
                    table.append({"omni_edit_id": f"e{i}", "src_img": f"img/{i}_s.png", "edited_img": f"img/{i}_t.png"})
                else:
                    ann.append({"id": f"s{i}", "instruction": ex["instruction"], "got": ex["got"],
                                "source_image": f"img/{i}_s.png", "target_image": f"img/{i}_t.png"})
            else:
                ex = shapes.generation_example(0, i, 32)
                Image.fromarray(ex["image"]).save(d / "img" / f"{i}.png")
                image_key = {"journeydb_got": "img_path"}.get(config, "image")
                ann.append({"id": f"g{i}", "caption": ex["caption"], "got": ex["got"], image_key: f"img/{i}.png"})
        (d / "annotations" / "part0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ann))
        if table:
            import pyarrow as pa
            import pyarrow.parquet as pq

            (d / "image_table").mkdir()
            pq.write_table(pa.Table.from_pylist(table), d / "image_table" / "part0.parquet")
        rows[folder] = len(ann)
    return rows


def write_shapes_ckpt(folder: Path) -> None:
    """A converted GoT folder of the tiny demo GoT with random weights (stand-in for a shapes-trained GoT)."""
    from got_jax.checkpoint.orbax_io import pure_tree, write_checkpoint_folder
    from got_jax.got.demo import demo_config, random_model
    from got_jax.got.tokenizer import BUNDLED_TOKENIZER_DIR

    config = demo_config()
    toks = {p.name: str(p) for p in BUNDLED_TOKENIZER_DIR.iterdir() if p.is_file()}
    write_checkpoint_folder(str(folder), dict(config, param_dtype="float32"), pure_tree(random_model(config, 0)), toks)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Runs every README step once against the stand-ins: ``work/ckpt/{GoT-6B, Qwen2.5-VL-3B-Instruct,
    stable-diffusion-xl-base-1.0}``, ``work/data/*``, commands run in ``work/run`` (outside the repository)."""
    from convert_helpers import save_standins

    work = tmp_path_factory.mktemp("readme")
    assert ROOT not in work.parents
    ck = work / "ckpt"
    paths = save_standins(ck)
    os.rename(paths["got"], ck / "GoT-6B")
    os.rename(paths["qwen"], ck / "Qwen2.5-VL-3B-Instruct")
    os.rename(paths["sdxl"], ck / "stable-diffusion-xl-base-1.0")
    write_shapes_ckpt(ck / SHAPES_CKPT)
    run_dir = work / "run"
    run_dir.mkdir()
    rows = write_sources(work / "data")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), np.uint8)).save(run_dir / "photo.jpg")
    (run_dir / "prompts.txt").write_text("a red circle\na blue square\nthree green triangles\n")
    plan = "<|object_ref_start|>a cat<|object_ref_end|><|box_start|>(100,300),(500,900)<|box_end|> (orange)"
    (run_dir / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in JSONL_ROWS(plan)))
    steps = plan_steps(work, run_dir)
    t = time.perf_counter()
    run_steps(steps, work / "logs")
    print(f"README steps: {time.perf_counter() - t:.0f} s wall; " +
          ", ".join(f"{st.group}:{st.seconds:.0f}s" for st in steps))
    return {"dir": work, "run": run_dir, "base_vocab": paths["base_vocab"], "rows": rows, "steps": steps}


def JSONL_ROWS(plan):  # noqa: N802 - the README's JSONL example, as rows
    return [{"prompt": "a red apple on a wooden table", "id": "apple", "seed": 7},
            {"prompt": "make the sky purple", "image": "photo.jpg", "id": "sky"},
            {"prompt": "a cat on a sofa", "got_text": plan}]


def steps_of(work, group: str) -> list[Step]:
    out = [st.check() for st in work["steps"] if st.group == group]
    assert out, group
    return out


# ------------------------------------------------------------------------------------ the tests


def test_steps_depend_on_what_they_read(work):
    """The runner's order: exports and every sampling step after the GoT conversion, the interactive
    painting after its chains, the shapes builds after the shapes set."""
    by = {st.readme: st for st in work["steps"]}
    got = next(st for st in work["steps"] if "got_jax.convert.got_checkpoint" in st.readme)
    for st in work["steps"]:
        if "/ckpt/got6b-jax" in st.readme and st is not got:
            assert got in st.deps, st.readme
    plans = next(st for st in by.values() if "--only_return_got" in st.readme)
    assert [plans] == [d for d in next(st for st in by.values() if "--got_text_file" in st.readme).deps if d.group == "sample"]


def test_convert_commands(work):
    """The converters from the released layouts; the GoT folder's tokenizer holds GoT's tokens on its rows."""
    from transformers import AutoTokenizer

    from got_jax.checkpoint.orbax_io import read_config
    from got_jax.got.tokenizer import GOT_TOKENS, got_token_ids

    assert len(steps_of(work, "convert")) == 5
    ck = work["dir"] / "ckpt"
    for name in ("got6b-jax", "qwen-jax", "sdxl-jax", "got6b-hf", "got6b-bin"):
        assert (ck / name).is_dir(), name
        assert (ck / name).stat().st_mode & 0o777 == 0o755, name  # readable by others (umask 022)
    cfg = read_config(str(ck / "got6b-jax"))
    rows = cfg["reasoner"]["text_config"]["vocab_size"]
    assert rows == work["base_vocab"] + 66
    tok = AutoTokenizer.from_pretrained(str(ck / "got6b-jax" / "tokenizer"))
    ids = [tok.convert_tokens_to_ids(t) for t in GOT_TOKENS]
    assert ids == list(range(work["base_vocab"], work["base_vocab"] + 66))  # released order, after Qwen's
    assert got_token_ids(tok).query[-1] == rows - 1
    assert (ck / "got6b-bin" / "pytorch_model.bin").is_file()
    assert (ck / "got6b-hf" / "reasoner" / "model.safetensors").is_file()


def test_sample_commands(work):
    """sample.py as the README runs it: the main command (the shipped demo GoT, no --ckpt), T2I, editing,
    interactive (chains only, then the file), a prompts file on a mesh with another scheduler."""
    run_dir = work["run"]
    steps = steps_of(work, "sample")
    assert len(steps) >= 8
    jsonl = [st for st in steps if "prompts.jsonl" in st.readme]
    assert len(jsonl) == 2 and "summary: 3 done" in jsonl[0].stdout and "already complete" in jsonl[1].stdout
    for st in steps:
        outdir = run_dir / re.search(r"--outdir (\S+)", st.readme).group(1)
        if "--only_return_got" in st.readme:
            assert sorted(p.name for p in outdir.iterdir()) == ["00000_got.txt", "records.jsonl", "run.json"]
            banner = next(ln for ln in st.stdout.splitlines() if "prompt(s) on" in ln)
            assert "nothing is painted" in banner and "steps" not in banner, banner
            continue
        if "prompts.jsonl" in st.readme:  # the batch run, then the same command again (a resume)
            recs = [json.loads(ln) for ln in (outdir / "records.jsonl").read_text().splitlines()]
            assert sorted(r["id"] for r in recs) == ["00002", "apple", "sky"], recs
            assert all(r["status"] == "ok" for r in recs) and all((outdir / f"{r['id']}.png").is_file() for r in recs)
            assert "all 3 item(s) already complete" in st.stdout or "summary: 3 done" in st.stdout, st.stdout
            continue
        n = len((run_dir / "prompts.txt").read_text().splitlines()) if "--prompts_file" in st.readme else 1
        for i in range(n):
            img = outdir / f"{i:05d}.png"
            assert img.is_file() and (outdir / f"{i:05d}_got.txt").is_file(), st.readme
            assert img.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        if "--image" in st.readme:  # resized back to the source's aspect ratio, short side = the output size
            w, h = Image.open(outdir / "00000.png").size
            assert h == SIZE and abs(w - SIZE * 80 / 48) < 1, (w, h)
        if "--got_text_file" in st.readme:
            plan = (run_dir / "plans" / "00000_got.txt").read_text().rstrip("\n")
            assert (outdir / "00000_got.txt").read_text().startswith(plan)
        if "--ckpt" in st.readme and "float32" not in st.readme:
            assert "--config.dtype=float32 reproduces the released PyTorch numbers" in st.stdout
        if "--ckpt" not in st.readme:  # the main command: the shipped demo GoT; chain, image and plan picture
            assert "demo: the small GoT trained on the synthetic shapes world" in st.stdout, st.stdout[-2000:]
            assert (outdir / "00000_layout.png").is_file() and "random" not in st.stdout


def test_eval_commands(work):
    """python -m got_jax.eval.shapes as the README runs it (on a tiny random-weight folder): the table printed,
    results.json with the six tasks, the images and the failures contact sheet written."""
    import json

    from got_jax.data.shapes import TASKS

    steps = steps_of(work, "eval")
    assert steps
    for st in steps:
        out = work["run"] / re.search(r"--out (\S+)", st.readme).group(1)
        res = json.loads((out / "results.json").read_text())
        assert set(res["tasks"]) == set(TASKS) and len(res["samples"]) == len(TASKS)
        assert (out / "failures.png").is_file() and all((out / s["image"]).is_file() for s in res["samples"])
        assert "overall" in st.stdout and all(t in st.stdout for t in TASKS)
        assert ("--no_layout" in st.readme) == res["settings"]["no_layout"]


def test_sheet_commands(work):
    """python -m got_jax.eval.sheet as the README runs it (the shipped demo, few steps): the picture is written."""
    for st in steps_of(work, "sheet"):
        out = st.cwd / re.search(r"--out (\S+)", st.readme).group(1)
        assert Image.open(out).size[0] > 200 and "wrote" in st.stdout, st.stdout[-2000:]


def test_python_api_snippet(work):
    """The Python API block as a plain script: T2I batch, editing, interactive plan."""
    (st,) = steps_of(work, "python_api")
    assert Image.open(st.cwd / "apple.png").size == (SIZE, SIZE) and (st.cwd / "apple_boxes.png").is_file()
    assert Image.open(st.cwd / "cat.png").size == (SIZE, SIZE)


def test_dataset_commands_and_pipeline_snippet(work):
    """Every dataset command (the real sources' stand-ins, then the shapes chain for both builders), then
    the Grain pipeline block as a plain script (no ``__main__`` guard) over the built shapes set."""
    built = {}
    for st in steps_of(work, "data"):
        if "got_jax.data.build" in st.readme:
            m = re.search(r"built (\S+) in .*: (\d+) examples", st.stdout)
            assert m, (st.readme, st.stdout)
            built[m.group(1).split("/1.")[0]] = int(m.group(2))
            folder = re.search(r"--manual_dir /data/(\S+)", st.readme).group(1)
            if folder in work["rows"]:
                assert int(m.group(2)) == work["rows"][folder], st.readme  # no row skipped
    assert built["got_generation/shapes"] == 6 and built["got_editing/shapes_edit"] == 3, built
    assert len(built) == len(REAL_SOURCES) + 2
    (st,) = steps_of(work, "python_data")
    assert "'target_image': (2, " in st.stdout, st.stdout[-2000:]


def test_train_and_export_commands(work):
    """The tiny run on the shapes set the README writes (resumable: checkpoints and metrics), and its export
    to PyTorch's layouts."""
    (train,) = steps_of(work, "train")
    run = work["dir"] / "runs" / "tiny"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps[-1] == TRAIN_SIZES["total_steps"], steps
    assert str(TRAIN_SIZES["total_steps"]) in os.listdir(run / "checkpoints")
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(run / "tensorboard"))
    (export,) = steps_of(work, "export")
    out = work["dir"] / "runs" / "tiny-export"
    assert (out / "pytorch_model.bin").is_file() or any(out.rglob("pytorch_model.bin")), sorted(out.rglob("*"))


def _train_argv(cmd: str) -> list[str]:
    """The ``train.py`` arguments of a pod command (inside ``gcloud ... --command="..."`` or plain)."""
    words = shlex.split(cmd)
    if words[0] == "gcloud":
        inner = next(w.split("=", 1)[1] for w in words if w.startswith("--command="))
        words = shlex.split(inner.split(";")[-1])
    return words[words.index("train.py") + 1:]


def test_pod_commands_name_real_flags_and_fields():
    """The README's pod / multi-process launch lines cannot run here (tests/test_train_run.py runs two processes
    on localhost): every flag they pass is a flag of train.py, the config file exists, every ``--config.*``
    override names a field of that config (after its stage preset) and the stage is one of its stages."""
    cmds = [c for c in readme_commands() if group_of(c) == "pod"]
    assert len(cmds) >= 3
    _check_train_commands(cmds)


def test_demo_commands_name_real_flags_and_fields():
    """The shipped demo's reproduction (45 min of CPU) is not run here; tests/test_demo_stages.py runs both
    stages and the export small. Its train.py lines pass real flags and config fields; its module commands
    name modules that exist and flags they define; it makes the data, both stages, the export and the eval, then
    the two ablation GoT stages on the same VAE, each exported with its switch (the export records the
    sampling defaults the eval reads) and evaluated."""
    import importlib.util

    cmds = [c for c in readme_commands() if group_of(c) == "demo"]
    train = [c for c in cmds if "train.py" in c]
    assert [re.search(r"--config\.stage=(\w+)", c).group(1) for c in train] == ["vae", "got", "got", "got"], train
    assert ["ablation" in c for c in train] == [False, False, True, True], train
    _check_train_commands(train)
    modules = [re.search(r"python -m (\S+)", c).group(1) for c in cmds if "train.py" not in c]
    assert modules == ["got_jax.data.shapes"] + ["got_jax.train.export", "got_jax.eval.shapes"] * 3, modules
    for ab in ("no_layout", "no_chain"):
        switch = f"--config.ablation.{ab}=True"
        (run,) = [c for c in train if switch in c]
        (export,) = [c for c in cmds if "got_jax.train.export" in c and switch in c]
        workdir = re.search(r"--workdir (\S+)", run).group(1)
        assert f"--workdir {workdir} " in export + " ", (run, export)
        out = re.search(r"--out (\S+)", export).group(1)
        assert any("got_jax.eval.shapes" in c and f"--ckpt {out} " in c + " " for c in cmds), (export, cmds)
    for cmd in cmds:
        if "train.py" in cmd:
            continue
        mod = re.search(r"python -m (\S+)", cmd).group(1)
        src = Path(importlib.util.find_spec(mod).origin).read_text()
        for flag in re.findall(r"(?:^|\s)--([\w.-]+)", cmd):
            if flag.startswith("config."):
                continue
            assert f'"--{flag}"' in src or f'"{flag}"' in src, (cmd, flag)


def _check_train_commands(cmds):
    import importlib.util

    from got_jax.train import setup

    defined = set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", (ROOT / "train.py").read_text()))
    for cmd in cmds:
        args = _train_argv(cmd)
        kv = dict(a[2:].split("=", 1) if "=" in a else (a[2:], args[args.index(a) + 1]) for a in args if a.startswith("--"))
        assert {k for k in kv if not k.startswith("config.")} <= defined, (cmd, defined)
        spec = importlib.util.spec_from_file_location("readme_config", ROOT / kv["config"])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        config = mod.get_config()
        for k, v in kv.items():
            if k.startswith("config."):
                node, *path = config, *k.split(".")[1:]
                for part in path[:-1]:
                    node = node[part]
                assert path[-1] in node, (cmd, k)
                if path == ["stage"]:
                    node[path[-1]] = v
        setup.resolve(config)  # raises on an unknown stage


def test_installed_package_runs_from_anywhere(tmp_path):
    """``pip install .`` (no deps) into a folder: converters, their console scripts and configs work from
    another directory with nothing of the checkout on the path."""
    import shutil

    src, target = tmp_path / "src", tmp_path / "site"  # a copy: pip builds in the source tree (build/, egg-info)
    src.mkdir()
    for name in ("setup.py", "got_jax", "configs", "convert"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        kw = {"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}
        copy(ROOT / name, src / name, **kw)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(src)], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    e = dict(env(), PYTHONPATH=str(target))
    checks = [
        [sys.executable, "-m", "got_jax.convert.got_checkpoint", "--help"],
        [sys.executable, "-m", "got_jax.convert.export_pytorch", "--help"],
        [str(target / "bin" / "got-jax-convert-sdxl"), "--help"],
        [sys.executable, "-c", "import got_jax, configs.data_got as d, configs.sample_demo as s; "
                               "assert got_jax.__file__.startswith(%r); print(d.generation_config().worker_count, "
                               "s.get_config().height)" % str(target)],
    ]
    for cmd in checks:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=e)
        assert r.returncode == 0, (cmd, r.stderr[-3000:])
    assert r.stdout.split() == ["0", "64"]
    # the shipped demo GoT comes with the package, every file of it (Orbax's nested ocdbt folders too)
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and "__pycache__" not in str(p))  # noqa: E731
    demo = ROOT / "got_jax" / "assets" / "demo"
    assert files(target / "got_jax" / "assets" / "demo") == files(demo) and (demo / "params").is_dir()
