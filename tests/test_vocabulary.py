"""One vocabulary across commands (docs/vocabulary.md), held for every command's parameters.

The walk starts at ``stn_deploy.cli``'s group and descends into every group, so a command
added later is held to the same table without touching this file. Each rule is its own test,
parametrized by command, so a failure names the rule and the command.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import stn_deploy.names as names
from stn_deploy.cli import cli
from stn_deploy.commands.options import (PRECISION_CHOICES, TARGET_CHOICES, TRT, AliasChoice,
                                         SampleCount, backend_names, json_option,
                                         library_name, parse_backends, write_json_text)

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


# ------------------------------------------- one vocabulary for the CLI and the library

def test_the_cli_takes_its_vocabulary_from_the_library() -> None:
    """The commands may import the library, not the other way round, so both take TensorRT's
    name, its aliases and the precisions from stn_deploy.names: the very same objects, never
    a copy that could drift."""
    from stn_deploy.commands import options
    from stn_deploy.export import request, targets

    assert options.PRECISION_CHOICES is names.PRECISIONS
    assert request.PRECISIONS is names.PRECISIONS
    assert options.TRT_ALIASES is names.TRT_ALIASES and options.TRT == names.TRT
    assert AliasChoice((names.TRT,)).aliases is names.TRT_ALIASES
    assert options.TARGET_CHOICES == targets.TARGETS
    assert names.PRECISIONS == ("fp32", "fp16", "bf16", "int8")  # docs/vocabulary.md
    assert dict(names.TRT_ALIASES) == {"tensorrt": "trt", "engine": "trt"}
    with pytest.raises(TypeError):  # read-only: no caller grows an alias of its own
        names.TRT_ALIASES["nvtrt"] = "trt"  # type: ignore[index]


@pytest.mark.parametrize("typed", [*names.TRT_ALIASES, *(a.upper() for a in names.TRT_ALIASES),
                                   "TensorRT", names.TRT])
def test_every_layer_reads_every_trt_alias(typed: str) -> None:
    """Every spelling in the one table is TensorRT wherever a user or a caller may type it:
    a private table that missed one (the target checker once knew no ``engine``) fails."""
    from stn_deploy.export.request import ExportRequest
    from stn_deploy.export.targets import canonical_target

    assert names.canonical(typed) == names.TRT
    assert AliasChoice(TARGET_CHOICES).convert(typed, None, None) == names.TRT
    assert parse_backends(typed, allow_all=False, multiple=False) == names.TRT
    req = ExportRequest(format=typed, target=typed)
    assert (req.format, req.target) == (names.TRT, names.TRT)
    assert canonical_target(typed) == names.TRT


def test_canonical_lower_cases_and_checks_nothing() -> None:
    """The library's callers refuse unknown names in their own words; canonical only spells.
    The CLI's backend names keep the user's case (runner names are case-sensitive)."""
    assert names.canonical("OpenVINO") == "openvino" and names.canonical("FP16") == "fp16"
    assert names.canonical("nonsense") == "nonsense"
    with pytest.raises(click.BadParameter, match="unknown backend OpenVINO;"):
        parse_backends("OpenVINO", allow_all=False, multiple=False)


def test_export_precisions_are_the_vocabulary() -> None:
    """export's --precision lists and defaults to what the library resolves and refuses by."""
    from stn_deploy.export.request import ExportRequest, OptionError, resolve

    (export,) = [c for p, c in COMMANDS if p == ("export",)]
    (option,) = _named(export, "--precision")
    assert isinstance(option.type, click.Choice)
    assert tuple(option.type.choices) == names.PRECISIONS
    assert option.default == names.DEFAULT_PRECISION == ExportRequest().precision
    assert ExportRequest(precision="FP16").precision == "fp16"
    with pytest.raises(OptionError) as refused:
        resolve(ExportRequest(precision="fp64"))
    assert str(refused.value).endswith("choose from " + ", ".join(names.PRECISIONS))


def test_a_plan_is_built_in_every_precision_but_bf16() -> None:
    from stn_deploy.artifacts import PLAN_PRECISIONS
    from stn_deploy.errors import StnDeployError
    from stn_deploy.export.tensorrt import build_settings

    assert PLAN_PRECISIONS == tuple(p for p in names.PRECISIONS if p != "bf16")
    for precision in PLAN_PRECISIONS:
        assert build_settings(10, precision)["clear"] == ["TF32"]
    with pytest.raises(StnDeployError, match="unknown precision 'bf16'"):
        build_settings(10, "bf16")


def _copies_of_the_vocabulary(path: Path) -> list[str]:
    """Literals in ``path`` that restate the alias table (a "tensorrt"/"engine" key mapped to
    trt) or the precision list (three or more precision names together)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if (isinstance(key, ast.Constant) and key.value in OLD_TRT
                        and ((isinstance(value, ast.Constant) and value.value == names.TRT)
                             or (isinstance(value, ast.Name) and value.id == "TRT"))):
                    found.append(f"{path.name}:{node.lineno} maps {key.value!r} to trt")
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            spelled = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            if len([v for v in spelled if v in names.PRECISIONS]) >= 3:
                found.append(f"{path.name}:{node.lineno} lists precisions {spelled}")
    return found


# Copies still to move to stn_deploy.names, by file: each names what is left.
NOT_YET_MOVED: dict[str, str] = {}


def test_no_module_restates_the_vocabulary() -> None:
    root = Path(names.__file__).parent
    problems = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == "names.py" or rel in NOT_YET_MOVED:
            continue
        problems += _copies_of_the_vocabulary(path)
    assert not problems, "take these from stn_deploy.names: " + "; ".join(problems)


def test_the_copy_finder_finds_copies(tmp_path: Path) -> None:
    """Guards the scan above against passing because it cannot see anything."""
    bad = tmp_path / "bad.py"
    bad.write_text('A = {"engine": "trt"}\nB = {"tensorrt": TRT}\n'
                   'C = ("fp32", "fp16", "int8")\nD = ("fp16", "int8")\n')
    assert len(_copies_of_the_vocabulary(bad)) == 3
    assert _copies_of_the_vocabulary(Path(names.__file__)) != []


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
