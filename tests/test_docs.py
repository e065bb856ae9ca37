"""The documentation's runnable command blocks run, and every command is in one of them.

A fenced ```bash block in README.md or docs/*.md whose previous line is ``<!-- test: run -->`` is
*runnable* (the convention is documented in docs/README.md). This file runs every runnable block,
in the order of :data:`DOC_ORDER` then file order, in one shared working folder, on a tiny
synthetic HAM10000-shaped data set, through the real Typer app in this process (no mocks), so a
renamed or removed option breaks the build. Rules for a runnable block:

- each command (lines joined at a trailing backslash; ``# comments`` dropped) starts with
  ``edgeskin`` and must exit 0;
- it may read the shell variables in :data:`VARIABLES`, which the test sets to tiny fixtures
  (any other variable is an error);
- ``https://dataverse.harvard.edu`` is replaced by a local Dataverse emulator (tests/test_fetch.py);
- ``edgeskin engine ...`` runs with the TensorRT test double installed (tests/tensorrt_double.py),
  for the TensorRT release and board the bundle names;
- the working folder holds a link ``recipes`` to the repository's recipes/.

A second test enumerates the app's commands and subcommands and requires each in a runnable block.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_ham_tree
from test_fetch import FakeDataverse, release  # noqa: F401  (release: the emulator's files, a fixture)

MARKER = "<!-- test: run -->"
DOC_ORDER = ["docs/cli.md"]  # run first, in this order; the other files follow in name order
VARIABLES = {"DATA": "a HAM10000-shaped folder", "IMAGE": "one image of it",
             "ONNX": "a tiny classifier exported to ONNX (32 px, NCHW, torchvision's input convention)"}
DATAVERSE = "https://dataverse.harvard.edu"
TIME_LIMIT_S = 90  # the CI budget this test was given; a block that outgrows it fails loudly


def doc_files() -> list[Path]:
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    first = [REPO / d for d in DOC_ORDER]
    return [f for f in first if f.exists()] + [f for f in files if f not in first]


def runnable_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, body) of every ```bash block whose previous line is the marker."""
    lines = path.read_text().splitlines()
    blocks, fenced = [], False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced or line.strip() != MARKER:  # a marker quoted inside a code block is not one
            continue
        fence = lines[i + 1].strip() if i + 1 < len(lines) else ""
        assert fence in ("```bash", "```sh"), f"{path.name}:{i + 1}: {MARKER} must sit right above a ```bash block"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
        blocks.append((i + 3, "\n".join(lines[i + 2:end])))
    return blocks


def commands(body: str, where: str) -> list[list[str]]:
    """The block's commands as argument lists (variables left as written)."""
    out = []
    for cmd in body.replace("\\\n", " ").splitlines():
        argv = shlex.split(cmd, comments=True)
        if not argv:
            continue
        assert argv[0] == "edgeskin", f"{where}: a runnable block holds edgeskin commands only, not {cmd!r}"
        out.append(argv[1:])
    return out


def all_runnable() -> list[tuple[str, list[str]]]:
    return [(f"{p.relative_to(REPO)}:{line}", argv) for p in doc_files() for line, body in runnable_blocks(p)
            for argv in commands(body, f"{p.relative_to(REPO)}:{line}")]


def expand(arg: str, values: dict[str, str], where: str) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        assert name in values, f"{where}: unknown variable ${name} (known: {', '.join(VARIABLES)})"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, arg).replace(DATAVERSE, values["_DATAVERSE"])


def command_paths() -> set[tuple[str, ...]]:
    """Every leaf command of the app, e.g. ('split',), ('calib', 'make')."""
    import typer

    from edgeskin.cli import app

    def walk(cmd, prefix: tuple[str, ...]) -> set[tuple[str, ...]]:  # noqa: ANN001  (typer's own click)
        subs = getattr(cmd, "commands", None)  # a group (typer vendors click, so no isinstance check)
        if subs:
            return {p for name, sub in subs.items() if not sub.hidden for p in walk(sub, (*prefix, name))}
        return {prefix}

    return walk(typer.main.get_command(app), ())


def test_every_command_is_in_a_runnable_block():
    tested = [argv for _, argv in all_runnable()]
    paths = command_paths()
    assert len(paths) >= 15, sorted(paths)
    missing = sorted(" ".join(p) for p in paths if not any(tuple(a[:len(p)]) == p for a in tested))
    assert not missing, (f"commands with no runnable example in the docs: {missing}; add one to docs/cli.md "
                         f"(a ```bash block right below {MARKER})")


def tiny_onnx(path: Path) -> Path:
    """input (1, 3, 32, 32) -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> 7 logits."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal((7, 8)).astype(np.float32), "fc"),
            numpy_helper.from_array(np.zeros(7, np.float32), "b")]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "fc", "b"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 7])], init)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def _engine_double(argv: list[str], cwd: Path, tmp: Path):
    """Install the TensorRT double for the release and board the bundle in ``argv`` names."""
    import tensorrt_double as trtd

    if trtd.real_tensorrt_installed():
        pytest.skip("a real TensorRT is installed: the double never replaces it")
    bundle = next(cwd / a for a in argv[2:] if not a.startswith("-"))
    engine = json.loads((bundle / "manifest.json").read_text())["engine"]
    board = next(b for b in trtd.BOARDS if engine["device"].endswith(b))
    trtd.install(engine["tensorrt"], board=board)
    return {"EDGESKIN_DEVICE_TREE": str(trtd.device_tree(tmp / f"dt-{board}", board)),
            "EDGESKIN_CACHE": str(tmp / "cache")}


@pytest.mark.slow
def test_runnable_blocks_run(tmp_path, release, monkeypatch):  # noqa: F811
    from typer.testing import CliRunner

    import tensorrt_double as trtd
    from edgeskin.cli import app

    work = tmp_path / "work"
    work.mkdir()
    (work / "recipes").symlink_to(REPO / "recipes")
    data = make_ham_tree(tmp_path / "ham", lesions_per_class=8)
    values = {"DATA": str(data), "IMAGE": str(next(data.glob("*/*.jpg"))),
              "ONNX": str(tiny_onnx(tmp_path / "member.onnx"))}
    monkeypatch.chdir(work)
    monkeypatch.delenv("EDGESKIN_DATA", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    server = FakeDataverse(release)
    values["_DATAVERSE"] = server.url
    env = {"COLUMNS": "120", "TORCH_HOME": str(tmp_path / "torch-home")}  # no ImageNet weights: random init
    runner = CliRunner()
    start, timings = time.monotonic(), []
    try:
        for where, argv in all_runnable():
            args = [expand(a, values, where) for a in argv]
            extra = _engine_double(args, work, tmp_path) if args[:1] == ["engine"] else {}
            t0 = time.monotonic()
            try:
                r = runner.invoke(app, args, env={**env, **extra}, catch_exceptions=True)
            finally:
                if extra:
                    trtd.uninstall()
            timings.append((round(time.monotonic() - t0, 1), where, " ".join(argv[:2])))
            assert r.exit_code == 0, (f"{where}: `edgeskin {shlex.join(argv)}` exited {r.exit_code}\n"
                                      f"{r.output[-3000:]}\n{r.exception!r}")
    finally:
        server.close()
    total = time.monotonic() - start
    assert total < TIME_LIMIT_S * 2, f"the docs' blocks took {total:.0f} s: {sorted(timings, reverse=True)[:5]}"
    # what the blocks made is really there
    assert (work / "student-int8.edgeskin" / "manifest.json").exists()
    assert (work / "bench" / "report.json").exists() and (work / "ham10000-download").is_dir()
    assert json.loads((work / "student-trt.edgeskin" / "manifest.json").read_text())["engine"]["engines"]
