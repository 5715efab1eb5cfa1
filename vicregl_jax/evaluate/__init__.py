"""Evaluations of frozen features: kNN and linear classification, linear segmentation, and
dense correspondence under known geometry; each module's `run(config, workdir, weights)` is
one mode of main.py."""
