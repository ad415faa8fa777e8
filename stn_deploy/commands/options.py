"""Options shared by several commands, defined once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

DATASET_CHOICES = ("digits", "cifar10", "imagefolder", "fashion-mnist")


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
