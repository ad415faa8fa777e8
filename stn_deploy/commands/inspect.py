"""``stn-deploy inspect``: what an ONNX file is and what a target runtime will mishandle."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("inspect")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--target", type=click.Choice(["onnxruntime", "tensorrt", "openvino"]),
              default=None, help="Also list what this runtime will mishandle.")
def inspect(model: Path, target: str | None) -> None:
    """Print MODEL's opset, inputs/outputs, op counts and stn-deploy metadata.

    With --target, exit 1 when the graph has a finding of severity error."""
    from collections import Counter

    import onnx

    from stn_deploy.errors import StnDeployError
    from stn_deploy.export.targets import check_target

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
    if target is None:
        return
    findings = check_target(proto, target)
    if not findings:
        click.echo(f"{target}: no findings")
        return
    for f in findings:
        click.echo(f"{target}: {f.line()}")
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        fixable = all(f.fixable for f in errors)
        raise StnDeployError(f"{len(errors)} finding(s) {target} would mishandle"
                             + ("; export --format engine rewrites them" if fixable else ""))
