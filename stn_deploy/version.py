"""The package version, in one place: ``pyproject.toml`` reads it (setuptools' dynamic
``attr``), the package exports it, and what stn-deploy writes (checkpoints, ONNX metadata,
bench reports) records it.

A module of its own, importing nothing, so every module can take the version without
importing the package root ``stn_deploy`` (whose import would run the package's
``__init__``).
"""

__version__ = "0.1.0"
