"""Evaluations of frozen features: linear classification, kNN, linear segmentation, and dense
correspondence under known geometry; `run` dispatches main.py's --mode."""

from __future__ import annotations


def run(mode: str, config, workdir: str, weights: str | None = None):
    """Runs one evaluation mode (or export / demo) and returns its results."""
    if mode == "knn":
        from vicregl_jax.evaluate import knn

        return knn.run(config, workdir, weights)
    if mode == "linear":
        from vicregl_jax.evaluate import linear

        return linear.run(config, workdir, weights)
    if mode == "segment":
        from vicregl_jax.evaluate import segment

        return segment.run(config, workdir, weights)
    if mode == "correspond":
        from vicregl_jax.evaluate import correspond

        return correspond.run(config, workdir, weights)
    if mode == "export":
        from vicregl_jax import convert

        return convert.export_torch(workdir, weights)
    if mode == "demo":
        from vicregl_jax import demo

        return demo.run_demo(config, workdir)
    raise ValueError(f"--mode={mode!r} is unknown; use pretrain, linear, knn, segment, correspond, export or demo.")
