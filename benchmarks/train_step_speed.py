"""Milliseconds per training step of the 145,104-parameter CIFAR-10 model on the CPU, in one
run: memory format (NCHW vs channels_last) x dropout (the seed's 0.05 vs none), and one row
with bf16 autocast (not used by the trainer; measured to size that option).

Random inputs, batch 64, SGD with Nesterov momentum: the step the trainer runs (forward,
loss, backward, optimizer step), timed after warm-up; the median of --steps steps.
Writes benchmarks/results/train_step_speed.{json,md}.
Usage: python benchmarks/train_step_speed.py [--steps 60] [--batch 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from _provenance import write_results
from stn_deploy.config import ModelConfig
from stn_deploy.model import build_model


def step_ms(layout: torch.memory_format, dropout: float, batch: int, steps: int,
            bf16: bool = False) -> float:
    torch.manual_seed(0)
    config = ModelConfig(dropout=dropout)
    model = build_model(config).to(memory_format=layout).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    x = torch.randn(batch, *config.input_shape).contiguous(memory_format=layout)
    y = torch.randint(0, config.num_classes, (batch,))
    times = []
    for i in range(steps + 10):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 10:  # warm-up excluded
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    rows = []
    for name, layout in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
        for dropout in (0.05, 0.0):
            ms = step_ms(layout, dropout, args.batch, args.steps)
            rows.append({"layout": name, "dropout": dropout, "ms_per_step": ms,
                         "s_per_epoch_50k": ms * 50_000 / args.batch / 1e3})
            print(f"{name:14s} dropout {dropout:.2f}: {ms:.1f} ms/step", flush=True)
    ms = step_ms(torch.channels_last, 0.0, args.batch, args.steps, bf16=True)
    rows.append({"layout": "channels_last + bf16 autocast", "dropout": 0.0, "ms_per_step": ms,
                 "s_per_epoch_50k": ms * 50_000 / args.batch / 1e3})
    doc = {"batch": args.batch, "steps": args.steps, "rows": rows}
    base = rows[0]["ms_per_step"]
    md = [f"# Training step, CIFAR-10 model, batch {args.batch}",
          "", "| layout | dropout | ms/step | s per 50,000 images | vs NCHW + dropout |",
          "|---|---:|---:|---:|---:|"]
    md += [f"| {r['layout']} | {r['dropout']} | {r['ms_per_step']:.1f} | "
           f"{r['s_per_epoch_50k']:.0f} | {base / r['ms_per_step']:.2f}x |" for r in rows]
    write_results("train_step_speed", doc, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
