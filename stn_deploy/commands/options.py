"""Options and parameter types shared by several commands, defined once.

docs/vocabulary.md is the table of names these implement; tests/test_vocabulary.py walks every
command's parameters and holds them to it. Only click and the standard library are imported
here, so every command's ``--help`` stays instant.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

DATASET_CHOICES = ("digits", "cifar10", "imagefolder", "fashion-mnist")
PRECISION_CHOICES = ("fp32", "fp16", "bf16", "int8")
# TensorRT's one name in every value a user types; the old spellings stay as quiet aliases.
TRT = "trt"
TRT_ALIASES = {"tensorrt": TRT, "engine": TRT}
TARGET_CHOICES = ("onnxruntime", "openvino", TRT)  # export/inspect --target
ALL = "all"


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

    def __init__(self, choices: tuple[str, ...], aliases: dict[str, str] | None = None) -> None:
        super().__init__(choices)
        self.aliases = TRT_ALIASES if aliases is None else aliases

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.lower() in self.aliases:
            value = self.aliases[value.lower()]
        return super().convert(value, param, ctx)


def canonical_backend(name: str) -> str:
    """A backend name with the quiet aliases resolved (``tensorrt`` -> ``trt``)."""
    return TRT_ALIASES.get(name, name)


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
                   default_help: str = "the model kind's first") -> Callable[[F], F]:
    """``--backend``: one runner name (or a comma-separated list / ``all`` where the command
    runs several), its choices listed in --help."""
    choices = ", ".join(backend_names()) + (", all" if allow_all else "")
    what = "Comma-separated runners" if multiple else "Runner"
    return click.option(
        "--backend", "backend", default=None, metavar="NAME" + ("[,NAME]" if multiple else ""),
        callback=lambda ctx, param, value: parse_backends(value, allow_all, multiple),
        help=f"{what}: {choices} [default: {default_help}].")


def json_option(what: str = "the results") -> Callable[[F], F]:
    """``--json FILE``: write ``what`` as JSON to FILE (``-``: standard output)."""
    return click.option("--json", "json_path", default=None, metavar="FILE",
                        type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
                        help=f"Write {what} as JSON to FILE ('-': standard output).")


def device_option(f: F) -> F:
    """``--device``: where torch runs; ``auto`` is the first CUDA device, else the CPU."""
    return click.option("--device", default="auto", show_default=True,
                        help="Where torch runs: auto (CUDA if visible, else cpu), cpu or "
                             "cuda[:N].")(f)


def dataset_options(f: F) -> F:
    f = click.option("--download", is_flag=True,
                     help="Download CIFAR-10 into --data-dir if it is not there (needs internet).")(f)
    f = click.option("--data-dir", type=click.Path(file_okay=False, path_type=str), default=None,
                     help="Dataset folder (cifar10: torchvision batches; imagefolder: train/ and "
                          "test/ of class folders; fashion-mnist: IDX files, default "
                          "/usr/share/datasets/fashion-mnist).")(f)
    f = click.option("--dataset", type=click.Choice(DATASET_CHOICES), default="digits",
                     show_default=True,
                     help="digits is scikit-learn's bundled set: no download.")(f)
    return f
