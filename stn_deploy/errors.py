"""One exception type for everything a user can cause, and one way to import an optional
package.

The CLI turns it into one line on stderr and exit code 1; anything else is a bug and keeps
its traceback.
"""

import importlib
from types import ModuleType


class StnDeployError(Exception):
    """A failure the user can act on (bad file, missing package, wrong option)."""


class MissingDependencyError(StnDeployError):
    """An optional package is not installed; the message says what to install."""

    def __init__(self, module: str, install: str, cause: BaseException | None = None) -> None:
        detail = f" ({cause})" if cause is not None else ""
        super().__init__(f"{module} is not available{detail}; install it with: {install}")
        self.module = module
        self.install = install


def error_line(e: BaseException, with_type: bool = False) -> str:
    """The first line of an exception from a library (ONNX Runtime, OpenVINO, torch, protobuf
    texts run to pages), or its type name when it has no text: what "Error: ..." shows.
    ``with_type`` prefixes the type, for errors whose text alone is ambiguous."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    first = text.splitlines()[0]
    return f"{type(e).__name__}: {first}" if with_type else first


def require(module: str, install: str, package: str | None = None) -> ModuleType:
    """Import an optional module, or fail with one line naming what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(package or module, install, e) from None
