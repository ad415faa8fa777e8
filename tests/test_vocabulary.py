"""One vocabulary across commands (docs/vocabulary.md), held for every command's parameters.

The walk starts at ``stn_deploy.cli``'s group and descends into every group, so a command
added later is held to the same table without touching this file. Each rule is its own test,
parametrized by command, so a failure names the rule and the command.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from stn_deploy.cli import cli
from stn_deploy.commands.options import (PRECISION_CHOICES, TRT, AliasChoice, SampleCount,
                                         backend_names, json_option, library_name,
                                         parse_backends, write_json_text)

FORBIDDEN = ("--name", "--max-batch", "--min-batch", "--opt-batch", "--calib-data",
             "--preferred-batch")
OLD_TRT = {"tensorrt", "engine"}
FILES_WRITTEN = ("--out", "--json", "--csv", "--markdown", "--plot")
CHOICE_OPTIONS = ("--backend", "--target", "--format", "--kind")
HEAVY = ("torch", "onnx", "onnxruntime", "openvino", "tensorrt")


def _walk(cmd: click.Command, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], object]]:
    """(path, command) for ``cmd`` and everything below it; a command whose module cannot be
    imported is kept as its exception, so the tests name it instead of collection failing."""
    found: list[tuple[tuple[str, ...], object]] = [(path, cmd)]
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd, info_name=path[-1] if path else "stn-deploy")
        for name in cmd.list_commands(ctx):
            try:
                sub = cmd.get_command(ctx, name)
            except Exception as e:  # an import error of one command module
                found.append(((*path, name), e))
                continue
            if sub is None:
                found.append(((*path, name), LookupError(f"{name} is listed but not found")))
            else:
                found += _walk(sub, (*path, name))
    return found


ALL = _walk(cli, ())
COMMANDS = [(p, c) for p, c in ALL if p]  # the root group has only --help/--version
IDS = [" ".join(p) for p, _ in COMMANDS]


def _options(cmd: object) -> list[click.Option]:
    if isinstance(cmd, Exception):
        pytest.fail(f"the command cannot be loaded: {type(cmd).__name__}: {cmd}")
    assert isinstance(cmd, click.Command)
    return [p for p in cmd.params if isinstance(p, click.Option)]


def _names(opt: click.Option) -> list[str]:
    return [n for n in (*opt.opts, *opt.secondary_opts) if n.startswith("--")]


def _named(cmd: object, name: str) -> list[click.Option]:
    return [o for o in _options(cmd) if name in _names(o)]


def test_the_walk_finds_every_registered_command() -> None:
    from stn_deploy.cli import COMMANDS as REGISTERED

    top = {p[0] for p, _ in COMMANDS}
    assert set(REGISTERED) <= top
    assert len(COMMANDS) >= len(REGISTERED)


def test_the_walk_descends_into_groups() -> None:
    """Subcommands (``debug compare``) are held to the table like commands."""
    @click.group()
    def top() -> None: ...

    @top.group()
    def debug() -> None: ...

    @debug.command()
    @click.option("--name")
    def compare(name: str | None) -> None: ...

    found = {p: c for p, c in _walk(top, ())}
    assert set(found) == {(), ("debug",), ("debug", "compare")}
    assert _names(_options(found[("debug", "compare")])[0]) == ["--name"]


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=IDS)
def test_files_written_are_file_paths(path: tuple[str, ...], cmd: object) -> None:
    """--out, --json, --csv, --markdown, --plot: a FILE (a folder written is --out-dir)."""
    problems = []
    for name in FILES_WRITTEN:
        for opt in _named(cmd, name):
            if opt.is_flag:
                problems.append(f"{name} is a flag; it takes a FILE")
            elif not isinstance(opt.type, click.Path):
                problems.append(f"{name} is {opt.type!r}, not a path")
            elif opt.type.dir_okay or not opt.type.file_okay:
                problems.append(f"{name} takes a FILE (a folder is --out-dir)")
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=IDS)
def test_json_takes_a_file_or_dash(path: tuple[str, ...], cmd: object) -> None:
    for opt in _named(cmd, "--json"):
        assert isinstance(opt.type, click.Path) and opt.type.allow_dash, \
            "--json FILE must accept '-' (standard output)"


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=IDS)
def test_folders_are_folder_paths(path: tuple[str, ...], cmd: object) -> None:
    """--out-dir, --data-dir, --calib-dir and every other --*-dir: a folder."""
    problems = [f"{name} is {opt.type!r}, not a folder path"
                for opt in _options(cmd) for name in _names(opt) if name.endswith("-dir")
                and not (isinstance(opt.type, click.Path) and opt.type.file_okay is False)]
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=IDS)
def test_no_retired_option_names(path: tuple[str, ...], cmd: object) -> None:
    problems = [f"{n} is retired" for opt in _options(cmd) for n in _names(opt)
                if n in FORBIDDEN]
    for opt in _named(cmd, "--model"):  # only ever a file (--factory names a module)
        if not (isinstance(opt.type, click.Path) and opt.type.dir_okay is False):
            problems.append("--model is a file; a user module is --factory "
                            "PACKAGE.MODULE:FACTORY")
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=IDS)
def test_sample_counts_take_n_or_all(path: tuple[str, ...], cmd: object) -> None:
    problems = [f"{name} is {opt.type!r}, not SampleCount (N or all)"
                for opt in _options(cmd) for name in _names(opt)
                if (name == "--samples" or name.endswith("-samples"))
                and not isinstance(opt.type, SampleCount)]
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=IDS)
def test_choices_are_listed_and_trt_is_trt(path: tuple[str, ...], cmd: object) -> None:
    problems = []
    for opt in _options(cmd):
        names = _names(opt)
        if isinstance(opt.type, click.Choice):
            old = sorted({str(c) for c in opt.type.choices} & OLD_TRT)
            if old:
                problems.append(f"{names[0]} lists {old}; TensorRT is {TRT}")
            if not opt.show_choices:
                problems.append(f"{names[0]} hides its choices")
        elif any(n in CHOICE_OPTIONS for n in names):
            if "--backend" not in names:
                problems.append(f"{names[0]} must be a choice (shown in --help)")
                continue
            missing = [n for n in backend_names() if n not in (opt.help or "")]
            if missing:
                problems.append(f"--backend's help does not list {missing}")
    assert not set(backend_names()) & OLD_TRT
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=IDS)
def test_precisions_are_spelled_alike(path: tuple[str, ...], cmd: object) -> None:
    problems = []
    for opt in _options(cmd):
        names = [n for n in _names(opt) if n.endswith("precision")]
        if not names:
            continue
        if not isinstance(opt.type, click.Choice):
            problems.append(f"{names[0]} must be a choice")
        elif not set(opt.type.choices) <= set(PRECISION_CHOICES):
            problems.append(f"{names[0]} lists {list(opt.type.choices)}; spell them "
                            f"{PRECISION_CHOICES}")
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=IDS)
def test_device_defaults_to_auto(path: tuple[str, ...], cmd: object) -> None:
    for opt in _named(cmd, "--device"):
        assert opt.default == "auto", f"--device defaults to {opt.default!r}"


@pytest.mark.parametrize("path", [p for p, _ in ALL], ids=[" ".join(p) or "stn-deploy"
                                                           for p, _ in ALL])
def test_every_help_exits_0_quickly(path: tuple[str, ...]) -> None:
    start = time.perf_counter()
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage:")
    assert time.perf_counter() - start < 2.0


def test_help_of_every_command_loads_no_runtime() -> None:
    """--help is instant because no command imports a runtime to describe itself."""
    paths = [list(p) for p, _ in ALL]
    code = ("import json, sys; from click.testing import CliRunner; "
            "from stn_deploy.cli import cli; "
            f"codes = [CliRunner().invoke(cli, [*p, '--help']).exit_code for p in {paths!r}]; "
            f"print(json.dumps([codes, [m for m in {HEAVY!r} if m in sys.modules]]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    codes, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert codes == [0] * len(paths) and heavy == []


# ------------------------------------------------------------- the shared types themselves

def test_sample_count() -> None:
    some, none_ok = SampleCount(), SampleCount(allow_none=True)
    assert some.convert("all", None, None) is None and some.convert("ALL", None, None) is None
    assert some.convert("64", None, None) == 64 and none_ok.convert("0", None, None) == 0
    for bad in ("0", "-3", "many", "1.5"):
        with pytest.raises(click.BadParameter):
            some.convert(bad, None, None)
    with pytest.raises(click.BadParameter):
        none_ok.convert("-1", None, None)


def test_trt_aliases_are_quiet() -> None:
    choice = AliasChoice(("onnxruntime", "openvino", TRT))
    for typed in ("trt", "tensorrt", "engine", "TensorRT"):
        assert choice.convert(typed, None, None) == TRT
    with pytest.raises(click.BadParameter):
        choice.convert("tensor", None, None)
    assert parse_backends("tensorrt,onnxruntime", allow_all=False, multiple=True) == (
        TRT, "onnxruntime")
    assert parse_backends("all", allow_all=True, multiple=True) == "all"
    with pytest.raises(click.BadParameter, match="choose from"):
        parse_backends("all", allow_all=False, multiple=False)
    with pytest.raises(click.BadParameter, match="one backend"):
        parse_backends("torch,onnxruntime", allow_all=False, multiple=False)
    # A library still spelling TensorRT its old way gets its own spelling.
    assert library_name(TRT, ("onnxruntime", "tensorrt")) == "tensorrt"
    assert library_name(TRT, ("onnxruntime", TRT)) == TRT
    assert library_name("openvino", ("openvino",)) == "openvino"


def test_json_option_writes_a_file_or_standard_output(tmp_path: Path) -> None:
    @click.command()
    @json_option("a document")
    def tool(json_path: Path | None) -> None:
        assert json_path is not None
        write_json_text(json_path, json.dumps({"n": 1}))

    out = tmp_path / "sub" / "doc.json"
    result = CliRunner().invoke(tool, ["--json", str(out)])
    assert result.exit_code == 0 and result.output == ""
    assert json.loads(out.read_text()) == {"n": 1} and out.read_text().endswith("\n")
    result = CliRunner().invoke(tool, ["--json", "-"])
    assert result.exit_code == 0 and json.loads(result.output) == {"n": 1}
    assert not Path("-").exists()
    result = CliRunner().invoke(tool, ["--json", str(tmp_path)])  # a folder: refused
    assert result.exit_code == 2 and "directory" in result.output


def test_device_is_checked_by_name() -> None:
    result = CliRunner().invoke(cli, ["predict", "--device", "gpu0", "x.pt", "y.png"])
    assert result.exit_code == 2
    assert re.search(r"--device.*'gpu0': use auto, cpu or cuda\[:N\]", result.output)
