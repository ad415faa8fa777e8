"""Options and parameter types shared by several commands, defined once.

docs/vocabulary.md is the table of names these implement; tests/test_vocabulary.py walks every
command's parameters and holds them to it. At import only click, the standard library and
stn_deploy.names load (the backend registry and file writing load inside functions, and
import no runtime), so every command's ``--help`` stays instant.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click

# TensorRT's name, its quiet aliases and the precisions are the library's too: they live in
# stn_deploy.names, below every layer, and are re-exported here for the commands.
from stn_deploy.names import OV_PRECISIONS, PRECISIONS, TRT, TRT_ALIASES

F = TypeVar("F", bound=Callable[..., Any])

DATASET_CHOICES = ("digits", "cifar10", "imagefolder", "fashion-mnist")
PRECISION_CHOICES = PRECISIONS  # the same tuple: a command lists those it honours
TARGET_CHOICES = ("onnxruntime", "openvino", TRT)  # export/inspect --target
# OpenVINO's compute precision for FP32 files (its own names are f32/bf16; ours are these).
OV_PRECISION_CHOICES = OV_PRECISIONS
ALL = "all"
STDOUT = "-"
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


class SampleCount(click.ParamType):
    """A number of images: a positive integer or ``all``; ``0`` (none) only where
    ``allow_none`` says skipping is meaningful. Parsed to int, with ``all`` as None.

    One meaning of 0 across commands: 0 is always "none", never "all"."""

    name = "samples"

    def __init__(self, allow_none: bool = False) -> None:
        self.allow_none = allow_none

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "N|all"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int | None:
        if value is None or isinstance(value, int):
            count = value
        elif str(value).strip().lower() == ALL:
            return None
        else:
            try:
                count = int(str(value))
            except ValueError:
                self.fail(f"{value!r} is not a number of images or 'all'", param, ctx)
        if count is not None and (count < 0 or (count == 0 and not self.allow_none)):
            self.fail(f"{value!r}: give a positive number or 'all'"
                      + (" (0: none)" if self.allow_none else ""), param, ctx)
        return count


class AliasChoice(click.Choice):
    """A choice that also takes old spellings quietly (not listed in --help): ``tensorrt`` and
    ``engine`` mean ``trt``."""

    def __init__(self, choices: tuple[str, ...],
                 aliases: Mapping[str, str] | None = None) -> None:
        super().__init__(choices)
        self.aliases = TRT_ALIASES if aliases is None else aliases

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.lower() in self.aliases:
            value = self.aliases[value.lower()]
        return super().convert(value, param, ctx)


def canonical_backend(name: str) -> str:
    """A backend name with the quiet aliases resolved (``tensorrt`` -> ``trt``). Unlike
    ``stn_deploy.names.canonical`` any other name keeps the user's case: runner names are
    case-sensitive like every other choice, and a wrong one is quoted back as typed."""
    return TRT_ALIASES.get(name.lower(), name)


def library_name(value: str, known: Iterable[str]) -> str:
    """The spelling a library function takes for a value the user typed: ``value`` itself when
    the library knows it, else the library's alias of it (a library that still spells TensorRT
    ``tensorrt`` gets ``tensorrt`` for ``trt``). Keeps the user's surface independent of the
    library's keyword values."""
    known = tuple(known)
    if value in known:
        return value
    return next((k for k in known if canonical_backend(k) == value), value)


def backend_names() -> tuple[str, ...]:
    """Every registered runner name (the registry imports no runtime)."""
    from stn_deploy.backends import BACKENDS

    return tuple(BACKENDS)


def parse_backends(value: str | None, allow_all: bool, multiple: bool) -> Any:
    """``--backend`` text -> None, ``"all"``, one name, or a tuple of names."""
    if value is None:
        return None
    names = [canonical_backend(v.strip()) for v in value.split(",") if v.strip()]
    if allow_all and names == [ALL]:
        return ALL
    known = backend_names()
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise click.BadParameter(f"unknown backend {', '.join(unknown) or repr(value)}; choose "
                                 f"from {', '.join(known)}" + (" or all" if allow_all else ""))
    if not multiple:
        if len(names) > 1:
            raise click.BadParameter("one backend here (no comma-separated list)")
        return names[0]
    return tuple(dict.fromkeys(names))


def backend_option(*, multiple: bool = False, allow_all: bool = False,
                   default_help: str = "the model kind's first", note: str = "",
                   dest: str = "backend") -> Callable[[F], F]:
    """``--backend``: one runner name (or a comma-separated list / ``all`` where the command
    runs several), its choices listed in --help. The registry is read when the command's
    module is imported; it imports no runtime, so --help stays instant."""
    choices = ", ".join(backend_names()) + (", all" if allow_all else "")
    what = "Comma-separated runners" if multiple else "Runner"
    return click.option(
        "--backend", dest, default=None, metavar="NAME" + ("[,NAME]" if multiple else ""),
        callback=lambda ctx, param, value: parse_backends(value, allow_all, multiple),
        help=f"{what}: {choices}{note} [default: {default_help}].")


def json_option(what: str = "the results", stdout_note: str = "") -> Callable[[F], F]:
    """``--json FILE``: write ``what`` as JSON to FILE (``-``: standard output)."""
    return click.option("--json", "json_path", default=None, metavar="FILE",
                        type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
                        help=f"Write {what} as JSON to FILE ('-': standard output"
                             f"{stdout_note}).")


def is_stdout(path: str | Path | None) -> bool:
    """Whether a ``--json``-like FILE is ``-``, standard output."""
    return path is not None and str(path) == STDOUT


def write_json_text(path: str | Path, text: str) -> None:
    """Write JSON text for ``--json FILE``: to standard output for ``-``, else atomically
    (a file is complete or absent, never half-written)."""
    if is_stdout(path):
        click.echo(text.rstrip("\n"))
        return
    from stn_deploy.fileio import write_text_atomic

    write_text_atomic(path, text if text.endswith("\n") else text + "\n")


def _check_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not DEVICE_PATTERN.fullmatch(value):
        raise click.BadParameter(f"{value!r}: use auto, cpu or cuda[:N]")
    return value


def device_option(f: F) -> F:
    """``--device``: where torch runs; ``auto`` is the first CUDA device, else the CPU (the
    runner resolves it, see stn_deploy.backends.base.Runner.auto_device)."""
    return click.option("--device", default="auto", show_default=True, callback=_check_device,
                        metavar="auto|cpu|cuda[:N]",
                        help="Where torch runs: auto (CUDA if visible, else cpu), cpu or "
                             "cuda[:N].")(f)


def dataset_options(f: F) -> F:
    f = click.option("--download", is_flag=True,
                     help="Download CIFAR-10 into --data-dir if it is not there (needs "
                          "internet).")(f)
    f = click.option("--data-dir", type=click.Path(file_okay=False, path_type=str), default=None,
                     help="Dataset folder (cifar10: torchvision batches; imagefolder: train/ and "
                          "test/ of class folders; fashion-mnist: IDX files, default "
                          "/usr/share/datasets/fashion-mnist).")(f)
    f = click.option("--dataset", type=click.Choice(DATASET_CHOICES), default="digits",
                     show_default=True,
                     help="digits is scikit-learn's bundled set: no download.")(f)
    return f


def batch_sizes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """``--batch-sizes 1,8,64`` -> (1, 8, 64): positive, deduplicated, ascending."""
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not sizes or any(s < 1 for s in sizes):
        raise click.BadParameter("batch sizes must be positive integers")
    return tuple(sorted(set(sizes)))


def pretrained_option(what: str) -> Callable[[F], F]:
    """``--pretrained NAME``: a model stn-deploy ships trained (stn_deploy.pretrained). An
    unknown name is a usage error naming the shipped ones; the files are checked against
    their record where the command loads them."""
    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        from stn_deploy.pretrained import names

        if value is not None and value not in names():
            shipped = ", ".join(names()) or "none in this install"
            raise click.BadParameter(f"no pretrained model {value!r}; shipped: {shipped}",
                                     ctx, param)
        return value

    from stn_deploy.pretrained import names

    shipped = ", ".join(names()) or "none in this install"
    return click.option("--pretrained", metavar="NAME", default=None, callback=callback,
                        help=f"A model stn-deploy ships trained, by name (shipped: {shipped}; "
                             f"each one's card is stn_deploy/pretrained/NAME.md): {what}.")
