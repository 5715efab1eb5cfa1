"""Conversion to and from the authors' PyTorch release, on the command line.

    python -m vicregl_jax.convert to-torch SRC OUT.pth [--full] [--epoch N] [--safetensors]
    python -m vicregl_jax.convert from-torch SRC.pth OUT_DIR --arch NAME [--mlp ...]

to-torch: SRC is a workdir (pre-training, or written by from-torch), its newest checkpoint;
OUT.pth the release's backbone state_dict (loads with strict=True into its resnet /
convnext) or, with --full, its full checkpoint {"epoch", "model": module.*}.
from-torch: SRC is a backbone file or a full checkpoint (.pth with or without "module.",
the release's training checkpoints with their optimiser state included, or .safetensors);
OUT_DIR becomes a workdir holding the weights (config.json and a checkpoint without
training state), which every evaluation reads (--workdir or --weights) and a run starts
from with --config.model.init_weights=OUT_DIR. It is written under the workdir lock that
pre-training takes; a workdir holding a pre-training run is refused, an earlier conversion
too unless --force (which moves it to OUT_DIR/replaced/N).

The layout mapping itself is vicregl_jax.layout (pure), the file reading vicregl_jax.torch_io,
and the model's weights in and out of workdirs vicregl_jax.release.
"""

from __future__ import annotations

import argparse
import os
import sys

from vicregl_jax import layout, models, release, safe_io, torch_io
from vicregl_jax import weights as weights_lib
from vicregl_jax import workdir as workdir_lib
from vicregl_jax.checkpoint import CheckpointError
from vicregl_jax.workdir import WorkdirLockedError

REPLACED_DIR = "replaced"  # where --force moves an earlier conversion


def export_torch(workdir: str, weights: str | None = None, *, safetensors: bool = False) -> dict:
    """Writes the release's backbone file and full checkpoint of a workdir's model (or of
    weights, another workdir) to workdir/export/; returns their paths."""
    model, _, _ = release.load_workdir_model(weights_lib.resolve(weights) or workdir)
    out = os.path.join(str(workdir), "export")
    backbone = release.export_release_files(
        model, os.path.join(out, f"{model.arch}_backbone.pth"), full=False, safetensors=safetensors
    )
    full = release.export_release_files(
        model, os.path.join(out, f"{model.arch}_full.pth"), full=True, safetensors=safetensors
    )
    print(f"exported {model.arch}: {', '.join(backbone + full)}", flush=True)
    return {"backbone": backbone, "full": full}


def _to_torch_main(args) -> None:
    torch_io.check_output_file(args.out)  # before the (slow) reading of the workdir
    model, _, step = release.load_workdir_model(args.src)
    written = release.export_release_files(
        model, args.out, full=args.full, epoch=args.epoch, safetensors=args.safetensors
    )
    print(f"{model.arch} (step {step}) -> {', '.join(written)}")


def check_out_dir(out_dir, *, force: bool = False) -> bool:
    """Raises ValueError when from-torch must not write OUT_DIR: it is a file, it holds a
    pre-training run (never written, even with force), or an earlier conversion (unless force);
    returns whether an earlier conversion is there to replace."""
    path = workdir_lib.absolute(out_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"OUT_DIR {out_dir} is a file: give the path of a folder (it is created if missing).")
    checkpoints = path / "checkpoints"
    steps = [p for p in checkpoints.iterdir() if p.name.isdigit()] if checkpoints.is_dir() else []
    if any((p / "train").exists() for p in steps) or (path / "metrics.jsonl").exists():
        raise ValueError(
            f"OUT_DIR {out_dir} holds a pre-training run (checkpoints with a training state): converted weights "
            "never go there, not even with --force; give another OUT_DIR."
        )
    earlier = bool(steps) or (path / "config.json").exists()
    if earlier and not force:
        raise ValueError(
            f"OUT_DIR {out_dir} already holds converted weights: give another OUT_DIR, or pass --force to replace "
            f"them (the earlier ones are moved to {path / REPLACED_DIR}, not deleted)."
        )
    return earlier


def _move_earlier(out_dir) -> None:
    """Moves an earlier conversion's config.json and checkpoints/ to OUT_DIR/replaced/<n>/."""
    path = workdir_lib.absolute(out_dir)
    n = 1
    while (path / REPLACED_DIR / str(n)).exists():
        n += 1
    target = path / REPLACED_DIR / str(n)
    target.mkdir(parents=True)
    for name in ("config.json", "checkpoints"):
        if (path / name).exists():
            (path / name).rename(target / name)
    print(f"{out_dir}: moved the earlier converted weights to {target}.")


def _from_torch_main(args) -> None:
    check_out_dir(args.out_dir, force=args.force)  # before the (slow) reading and conversion
    if workdir_lib.absolute(args.out_dir).exists():
        workdir_lib.WorkdirLock(workdir_lib.absolute(args.out_dir)).acquire().release()  # a run there: refused now
    state_dict = torch_io.read_torch_weights(args.src)
    overrides = {
        "model.mlp": args.mlp,
        "model.maps_mlp": args.maps_mlp,
        "model.num_classes": args.num_classes,
        "loss.alpha": args.alpha,
        "model.dtype": args.dtype,
        "seed": args.seed,
    }
    config = release.converted_config(state_dict, args.arch, **overrides)
    model, parts = release.model_from_release(state_dict, config)
    # The lock a pre-training run takes: a run cannot start there while the weights are written.
    with workdir_lib.WorkdirLock(workdir_lib.absolute(args.out_dir)):
        if check_out_dir(args.out_dir, force=args.force):  # again, under the lock
            _move_earlier(args.out_dir)
        release.write_workdir(model, config, args.out_dir)
    fresh = [p for p in layout.PARTS if getattr(model, p, None) is not None and p not in parts]
    print(
        f"{args.arch}: loaded {', '.join(parts)} from {args.src} -> {args.out_dir}"
        + (f" (freshly initialised: {', '.join(fresh)})" if fresh else "")
    )


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one `error:` line as every other error."""

    def error(self, message):
        sys.exit(f"error: {message} (see {self.prog} --help)")


def main(argv: list[str] | None = None) -> None:
    """Runs the to-torch / from-torch command line."""
    parser = _Parser(prog="python -m vicregl_jax.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to = sub.add_parser("to-torch", help="a workdir -> the release's .pth")
    to.add_argument("src", help="a pre-training workdir, or one written by from-torch")
    to.add_argument("out", help="output .pth")
    to.add_argument(
        "--full", action="store_true", help="a full checkpoint {'epoch', 'model': module.*} instead of the backbone"
    )
    to.add_argument("--epoch", type=int, default=0, help="epoch stored with --full")
    to.add_argument("--safetensors", action="store_true", help="also write .safetensors")
    frm = sub.add_parser("from-torch", help="the release's .pth / .safetensors -> a workdir")
    frm.add_argument("src", help="backbone .pth, full checkpoint .pth, or .safetensors")
    frm.add_argument("out_dir", help="output workdir")
    frm.add_argument("--arch", required=True, choices=list(models.ARCHITECTURES))
    frm.add_argument("--mlp", default=None, help="expander spec (inferred from full checkpoints)")
    frm.add_argument("--maps-mlp", dest="maps_mlp", default=None, help="local projector spec")
    frm.add_argument(
        "--alpha", type=float, default=None, help="global/local weight (default 0.75; only 0/1/between is in the file)"
    )
    frm.add_argument("--num-classes", dest="num_classes", type=int, default=None)
    frm.add_argument("--dtype", default=None, help="compute dtype, e.g. bfloat16")
    frm.add_argument("--seed", type=int, default=None, help="seed of heads not in the file")
    frm.add_argument(
        "--force",
        action="store_true",
        help=f"replace the converted weights already in OUT_DIR (moved to OUT_DIR/{REPLACED_DIR}/N, not deleted); "
        "a pre-training workdir is never written",
    )
    args = parser.parse_args(argv)
    try:
        (_to_torch_main if args.command == "to-torch" else _from_torch_main)(args)
    except (ValueError, FileNotFoundError, CheckpointError, WorkdirLockedError, safe_io.DiskFullError) as e:
        sys.exit(f"error: {' '.join(str(e).split())}")


if __name__ == "__main__":
    main()
