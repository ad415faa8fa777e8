"""The ``stn-deploy`` command: a Click group whose commands are imported on first use.

Each command lives in its own module; heavy imports (torch, onnx, tensorrt) happen inside the
command bodies, so ``stn-deploy --help`` is instant and works without optional packages.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

import click

from stn_deploy.version import __version__

# name -> "module:attribute"
COMMANDS: dict[str, str] = {
    "train": "stn_deploy.commands.train:train",
    "demo": "stn_deploy.commands.demo:demo",
    "export": "stn_deploy.commands.export:export",
    "inspect": "stn_deploy.commands.inspect:inspect",
    "bench": "stn_deploy.commands.bench:bench",
    "predict": "stn_deploy.commands.predict:predict",
    "triton-repo": "stn_deploy.commands.triton_repo:triton_repo",
    "serve": "stn_deploy.commands.serve:serve",
    "loadtest": "stn_deploy.commands.loadtest:loadtest",
    "debug": "stn_deploy.commands.debug:debug",
    "profile": "stn_deploy.commands.profile:profile",
}


class LazyGroup(click.Group):
    """Imports a command's module only when that command is listed or run."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._spec_exists(name)]

    @staticmethod
    def _spec_exists(name: str) -> bool:
        module = COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(module) is not None

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS or not self._spec_exists(name):
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context) -> Any:
        from stn_deploy.errors import StnDeployError

        try:
            return super().invoke(ctx)
        except StnDeployError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stn-deploy")
def cli() -> None:
    """Train a Spatial Transformer Network classifier, export it to ONNX at an exact opset (and
    to TensorRT where a GPU is), and prove every deployed form as accurate as PyTorch."""


def main() -> None:
    try:
        cli.main(prog_name="stn-deploy")
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
