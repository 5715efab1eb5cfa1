"""The accelerator targets against the tables benchmarks/gpu.sh saved.

    python benchmarks/targets.py OUT_DIR      # after bash benchmarks/gpu.sh OUT_DIR

Reads OUT_DIR/{train_bench,torch_step_bench,model_bench}.txt and prints one row per target:
the value measured, the target, and whether it is met ("not measured" where a part did not
print the row it needs, e.g. cut by its time limit).
"""

from __future__ import annotations

import os
import re
import sys

from common import print_table


def tables(path: str) -> list[dict]:
    """Returns the rows of every markdown table in a file (none if the file is missing); a
    table starts at a line followed by a separator line, so a table cut short by a time limit
    and followed by another still parses."""
    if not os.path.exists(path):
        return []
    lines = [line.strip() for line in open(path, errors="replace")]

    def cells(line):
        return [c.strip() for c in line.strip("|").split("|")]

    def separator(line):
        return line.startswith("|") and all(set(c) <= set("-: ") for c in cells(line))

    rows, header = [], None
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            header = None
        elif i + 1 < len(lines) and separator(lines[i + 1]):
            header = cells(line)
        elif header is not None and not separator(line):
            rows.append(dict(zip(header, cells(line))))
    return rows


def number(text) -> float | None:
    m = re.search(r"-?[\d,]*\.?\d+", str(text or ""))
    return float(m.group(0).replace(",", "")) if m else None


def find(rows, key, value):
    return next((r for r in rows if value in r.get(key, "")), None)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/vicregl_gpu_bench"
    step = tables(os.path.join(out, "train_bench.txt"))
    torch_step = tables(os.path.join(out, "torch_step_bench.txt"))
    model = tables(os.path.join(out, "model_bench.txt"))
    results = []

    def target(name, value, goal, met):
        results.append(
            {
                "target": name,
                "measured": "not measured" if value is None else value,
                "goal": goal,
                "met": "-" if value is None else ("yes" if met else "no"),
            }
        )

    for config, label, goal in (
        ("convnext_s", "ConvNeXt-S multi-crop step / its backbone share", 0.85),
        ("r50", "ResNet-50 step / its backbone's rate", 0.90),
    ):
        row = find(step, "config", config)
        value = number(row and row.get("step / share"))
        target(label, None if value is None else f"{value:.2f}", f">= {goal:.2f}", value is not None and value >= goal)
    for config, torch_config in (("convnext_s", "convnext.py"), ("r50", "r50.py")):
        jax_row, torch_row = find(step, "config", config), find(torch_step, "config", torch_config)
        a, b = number(jax_row and jax_row.get("images/s")), number(torch_row and torch_row.get("images/s"))
        value = a / b if a and b else None
        target(
            f"JAX / PyTorch full step, {config} (images/s)",
            None if value is None else f"{value:.2f}x",
            ">= 1.5x",
            value is not None and value >= 1.5,
        )
    row = find(model, "arch", "convnext_small")
    a, b = number(row and row.get("JAX peak MiB")), number(row and row.get("torch peak MiB"))
    target(
        "ConvNeXt-S backbone peak, JAX / PyTorch (batch 256)",
        None if not (a and b) else f"{a:,.0f} / {b:,.0f} MiB",
        "<= 1",
        bool(a and b and a <= b),
    )
    row = find(step, "config", "convnext_s")
    value = number(row and row.get("compile"))
    target(
        "ConvNeXt-S step compile",
        None if value is None else f"{value:.1f} s",
        "< 60 s",
        value is not None and value < 60,
    )
    print_table(results)


if __name__ == "__main__":
    main()
