"""Wrong values at the edge, generated rather than hand-picked (hypothesis): every numeric option of
every command and every recipe key. Each must end in an ``error:`` line (and a ``hint:``) with exit
code 2, naming what was wrong, and never in a traceback. In-process, so it runs in seconds."""

from __future__ import annotations

import json
import math
import sys
import typing
from pathlib import Path

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeskin.cli import app, main
from edgeskin.errors import ConfigError
from edgeskin.recipe import _value_specs, load_recipe
from edgeskin.targets.options import _types as compile_option_types
from edgeskin.validate import Int, _ok

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---------------------------------------------------------------- the command line

def _commands():
    def walk(c, path):
        if hasattr(c, "commands"):
            for name, sub in c.commands.items():
                yield from walk(sub, path + [name])
        else:
            yield path, c

    return list(walk(typer.main.get_command(app), []))


def _number_kind(param) -> type | None:
    ann = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    kinds = {a for a in (ann, *typing.get_args(ann)) if a in (int, float)}
    return next(iter(kinds), None)


NUMERIC = [(tuple(path), p.opts[0], _number_kind(p), p.min, p.max)
           for path, c in _commands() for p in c.params if _number_kind(p) is not None]


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    old = sys.argv
    sys.argv = ["edgeskin", *argv]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_every_numeric_option_declares_its_range():
    assert len(NUMERIC) > 30
    missing = [f"{' '.join(path)} {opt}" for path, opt, _, lo, hi in NUMERIC if lo is None and hi is None]
    assert not missing, f"numeric options without a range: {missing}"


@st.composite
def bad_number(draw, kind: type, lo, hi) -> str:
    options = [st.sampled_from(["fifty", "", "1e", "0x10", "1,5", "ten", "--", "None", "[1]"])]
    if kind is int:
        options.append(st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()).map(repr))
    if lo is not None:
        options.append(st.integers(max_value=math.ceil(lo) - 1, min_value=-10**12).map(str))
        if kind is float:
            options.append(st.just("nan"))
    if hi is not None:
        options.append(st.integers(min_value=math.floor(hi) + 1, max_value=10**12).map(str))
    return draw(st.one_of(options))


@SETTINGS
@given(data=st.data())
def test_wrong_numbers_on_the_command_line_end_in_an_error_line(data, capsys):
    path, opt, kind, lo, hi = data.draw(st.sampled_from(NUMERIC))
    value = data.draw(bad_number(kind, lo, hi))
    code, text = run_main([*path, f"{opt}={value}"], capsys)
    assert "Traceback" not in text, text
    assert code == 2, (path, opt, value, text)
    assert "error:" in text and "hint:" in text, text
    assert opt in text or opt.lstrip("-") in text, (opt, text)


def test_examples_from_the_bench_issue(capsys):
    for value in ("0", "-5"):
        code, text = run_main(["bench", "--reference", "x", "--runs", value], capsys)
        assert code == 2 and "error:" in text and "--runs" in text and "Traceback" not in text


# ---------------------------------------------------------------- recipes

BASE = 'name = "fuzz"\n\n[[targets]]\ntarget = "cpu"\nprecision = "fp32"\n'


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, (int, str)):
        # JSON leaves DEL (0x7f) as it is; TOML wants it escaped
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    return "[" + ", ".join(toml_value(x) for x in v) + "]"


def _invalid(spec):
    """Values of every kind; the ones the spec refuses."""
    scalar = st.one_of(st.text(max_size=12), st.integers(-10**9, 10**9), st.booleans(),
                       st.floats(allow_nan=True, allow_infinity=True, width=32), st.just(""))
    anything = st.one_of(scalar, st.lists(scalar, max_size=4))
    if isinstance(spec, Int):
        anything = st.one_of(anything, st.integers(-10**12, 10**12))

    def refused(v) -> bool:
        try:
            _ok(v, spec)
        except ValueError:
            return True
        return False

    return anything.filter(refused)


SECTIONS = {sec: specs for sec, specs in _value_specs().items() if sec not in ("", "targets")}
KEYS = [(sec, key) for sec, specs in SECTIONS.items() for key in specs]
TARGET_KEYS = sorted(compile_option_types())


def _recipe_text(section: str, key: str, value) -> str:
    line = f"{key} = {toml_value(value)}\n"
    if section == "targets":
        return BASE + line
    return BASE.replace("[[targets]]", f"[{section}]\n{line}\n[[targets]]", 1)


@SETTINGS
@given(data=st.data())
def test_wrong_recipe_values_are_refused_when_read(data, tmp_path):
    section, key = data.draw(st.sampled_from(KEYS + [("targets", k) for k in TARGET_KEYS]))
    spec = (compile_option_types()[key] if section == "targets" else SECTIONS[section][key])
    value = data.draw(_invalid(spec))
    path = tmp_path / "fuzz.toml"
    path.write_text(_recipe_text(section, key, value))
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert str(path) in info.value.message and key in info.value.message, info.value.message
    assert info.value.hint


@pytest.mark.parametrize("section,line", [("bench", 'runs = "fifty"'), ("calibration", "size = -3"),
                                          ("ensemble", "epochs = 2.5"), ("split", "fractions = [0.9, 0.0, 0.1]")])
def test_examples_from_the_bench_issue_fail_a_dry_run(section, line, tmp_path, capsys):
    path = tmp_path / "r.toml"
    path.write_text(BASE.replace("[[targets]]", f"[{section}]\n{line}\n\n[[targets]]", 1))
    code, text = run_main(["run", str(path), "--dry-run"], capsys)
    assert code == 2 and "error:" in text and "hint:" in text and "Traceback" not in text
    assert line.split(" =")[0] in text


def test_the_exit_code_table_in_the_docs_is_the_codes():
    from edgeskin.errors import EXIT_TABLE

    doc = (Path(__file__).resolve().parent.parent / "docs" / "exit-codes.md").read_text()
    rows = [line.split("|")[1:3] for line in doc.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [(int(c), m.strip()) for c, m in rows] == [(code, meaning) for code, _, meaning in EXIT_TABLE]
