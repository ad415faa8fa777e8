"""``stn-deploy inspect``: what an ONNX file is and what a target runtime will mishandle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from stn_deploy.commands.options import TARGET_CHOICES, AliasChoice, library_name


@click.command("inspect")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--target", type=AliasChoice(TARGET_CHOICES), default=None,
              help="Also list what this runtime will mishandle (ONNX files).")
@click.option("--data-dir", type=click.Path(exists=True, file_okay=False, path_type=str),
              default=None, help="A checkpoint's dataset, to measure its STN's health "
                                 "(digits and fashion-mnist: not needed).")
def inspect(model: Path, target: str | None, data_dir: str | None) -> None:
    """Print what MODEL is and how its STN behaves.

    An ONNX file: opset, inputs/outputs, op counts, stn-deploy metadata and the STN health
    measured at export. A checkpoint: its config and training, and the STN's health measured
    now on its test split. With --target, exit 1 when the graph has a finding of severity
    error. A folder: a Triton model repository, validated (one line per problem, exit 1)."""
    from stn_deploy.artifacts import model_kind

    if model.is_dir():
        from stn_deploy.serving.validate import inspect_repository

        inspect_repository(model, click.echo)
        return
    if model_kind(model) == "checkpoint":
        if target is not None:
            raise click.UsageError("--target checks ONNX graphs; export the checkpoint first")
        _inspect_checkpoint(model, data_dir)
        return
    proto = _inspect_onnx(model)
    if target is not None:
        _check_target(proto, target)


def _inspect_onnx(model: Path) -> Any:
    """Print the file's opset, tensors, op counts and stn-deploy metadata; the loaded graph."""
    from collections import Counter

    import onnx

    from stn_deploy.errors import StnDeployError

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as e:  # protobuf decode errors have no common base
        raise StnDeployError(f"{model} is not a readable ONNX file ({e})") from None
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in proto.opset_import)
    click.echo(f"{model}: opset {opsets}, IR {proto.ir_version}, producer "
               f"{proto.producer_name or '?'} {proto.producer_version}")

    def describe(v: onnx.ValueInfoProto) -> str:
        t = v.type.tensor_type
        dims = [d.dim_param or str(d.dim_value) for d in t.shape.dim]
        return f"{v.name} {onnx.TensorProto.DataType.Name(t.elem_type).lower()}[{','.join(dims)}]"

    click.echo("inputs:  " + "; ".join(describe(v) for v in proto.graph.input))
    click.echo("outputs: " + "; ".join(describe(v) for v in proto.graph.output))
    ops = Counter(n.op_type for n in proto.graph.node)
    click.echo("ops:     " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))
    meta = {p.key: p.value for p in proto.metadata_props}
    for key in ("precision", "exporter", "affine_grid", "input_layout", "input_dtype",
                "num_classes", "source_sha256", "stn_deploy.version"):
        if key in meta:
            click.echo(f"{key}: {meta[key]}")
    if "stn_health" in meta:
        _echo_health("STN health (measured at export)", json.loads(meta["stn_health"]))
    return proto


def _check_target(proto: Any, target: str) -> None:
    """One line per finding for ``target`` (as the user spells it); exit 1 on an error."""
    from stn_deploy.errors import StnDeployError
    from stn_deploy.export.targets import TARGETS, check_target

    findings = check_target(proto, library_name(target, TARGETS))
    if not findings:
        click.echo(f"{target}: no findings")
        return
    for f in findings:
        click.echo(f"{target}: {f.line()}")
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        fixable = all(f.fixable for f in errors)
        raise StnDeployError(f"{len(errors)} finding(s) {target} would mishandle"
                             + ("; export --format trt rewrites them" if fixable else ""))


def _echo_health(title: str, health: dict[str, Any]) -> None:
    from stn_deploy.health import from_dict

    h = from_dict(health)
    click.echo(f"{title}: {h.summary()}")
    for w in getattr(h, "warnings", []):
        click.echo(f"warning: {w}")


def _inspect_checkpoint(path: Path, data_dir: str | None) -> None:
    from stn_deploy.checkpoint import load_checkpoint
    from stn_deploy.data import model_split
    from stn_deploy.errors import StnDeployError
    from stn_deploy.health import measure_set

    ckpt = load_checkpoint(path)
    model = ckpt.model()
    c = ckpt.config
    click.echo(f"{path}: stn-deploy checkpoint, epoch {ckpt.epoch}, "
               f"{sum(p.numel() for p in model.parameters()):,} parameters")
    click.echo(f"model:   {c.dataset}, input {'x'.join(map(str, c.input_shape))}, "
               f"{c.num_classes} classes, distort {c.distort}, "
               + (f"STN ({c.loc_net} localization net, {c.loc_act}, {c.stn_passes} "
                  f"pass{'es' if c.stn_passes > 1 else ''})" if c.use_stn else "no STN"))
    if ckpt.history:
        last = ckpt.history[-1]
        click.echo(f"trained: test accuracy {100 * last['test_acc']:.2f}% after epoch "
                   f"{last['epoch']}")
    try:
        test = model_split(c, "test", data_dir, seed=int(ckpt.train_args.get("seed", 0) or 0))
    except StnDeployError as e:
        click.echo(f"STN health: not measured ({e})")
        return
    health = measure_set(model, test)
    _echo_health(f"STN health on the {c.dataset} test split ({len(test)} images)",
                 health.to_dict())
