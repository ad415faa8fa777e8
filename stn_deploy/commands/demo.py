"""``stn-deploy demo``: the whole job end to end on the embedded digits, no download."""

from __future__ import annotations

import click


def _step(title: str, args: list[str]) -> None:
    from stn_deploy.cli import cli

    click.secho(f"\n== {title}: stn-deploy {' '.join(args)}", bold=True)
    cli.main(args, prog_name="stn-deploy", standalone_mode=False)


@click.command()
@click.option("--out-dir", "out_dir", type=click.Path(file_okay=False), default="export/demo",
              show_default=True, help="Folder for the checkpoint, exported models and reports.")
@click.option("--epochs", type=click.IntRange(1), default=20, show_default=True,
              help="20: the rts recipe's STN has taken off by then (66% of the rotation undone).")
@click.option("--opset", type=click.IntRange(16), default=16, show_default=True)
@click.option("--quick", is_flag=True, help="Fewer epochs and iterations (a smoke run).")
def demo(out_dir: str, epochs: int, opset: int, quick: bool) -> None:
    """Train on RTS-distorted digits (the rts recipe, large localization net, two passes),
    export verified FP32 and INT8 ONNX at --opset, and benchmark them on PyTorch, ONNX Runtime
    and OpenVINO (those installed)."""
    from pathlib import Path

    out = Path(out_dir)
    if quick:  # still enough for a model whose INT8 export passes its agreement check
        epochs = min(epochs, 6)
    ckpt = out / "train" / "last.pt"
    _step("train", ["train", "--dataset", "digits", "--distort", "rts", "--epochs", str(epochs),
                    "--out-dir", str(out / "train"), "--quiet"])
    fp32 = out / f"stn-opset{opset}-fp32.onnx"
    int8 = out / f"stn-opset{opset}-int8.onnx"
    _step("export FP32", ["export", str(ckpt), "--opset", str(opset), "--with-theta",
                          "--out", str(fp32)])
    _step("export INT8", ["export", str(ckpt), "--opset", str(opset), "--precision", "int8",
                          "--with-theta", "--out", str(int8)])
    from stn_deploy.backends import unavailable_reason

    # torch-compile is left out: compiling for each batch size takes longer than the rest of
    # the demo together (`stn-deploy bench --backend all` runs it).
    backends = [b for b in ("torch", "onnxruntime", "openvino") if unavailable_reason(b) is None]
    iterations = "20" if quick else "50"
    _step("bench", ["bench", str(ckpt), str(fp32), str(int8), "--backend", ",".join(backends),
                    "--batch-sizes", "1,64", "--iterations", iterations,
                    "--json", str(out / "bench.json"), "--markdown", str(out / "bench.md"),
                    "--plot", str(out / "bench.png")])
    click.secho(f"\nDone. Pictures: {out / 'train' / 'transforms.png'}, "
                f"{out / 'train' / 'curves.png'}; report: {out / 'bench.md'}", bold=True)
