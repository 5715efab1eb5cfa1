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
from with --config.model.init_weights=OUT_DIR.

The layout mapping itself is vicregl_jax.layout (pure), the file reading vicregl_jax.torch_io,
and the model's weights in and out of workdirs vicregl_jax.release.
"""

from __future__ import annotations

import argparse
import os
import sys

from vicregl_jax import layout, models, release, torch_io
from vicregl_jax import weights as weights_lib


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
    model, _, step = release.load_workdir_model(args.src)
    written = release.export_release_files(
        model, args.out, full=args.full, epoch=args.epoch, safetensors=args.safetensors
    )
    print(f"{model.arch} (step {step}) -> {', '.join(written)}")


def _from_torch_main(args) -> None:
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
    release.write_workdir(model, config, args.out_dir)
    fresh = [p for p in layout.PARTS if getattr(model, p, None) is not None and p not in parts]
    print(
        f"{args.arch}: loaded {', '.join(parts)} from {args.src} -> {args.out_dir}"
        + (f" (freshly initialised: {', '.join(fresh)})" if fresh else "")
    )


def main(argv: list[str] | None = None) -> None:
    """Runs the to-torch / from-torch command line."""
    parser = argparse.ArgumentParser(prog="python -m vicregl_jax.convert", description=__doc__.split("\n")[0])
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
    args = parser.parse_args(argv)
    try:
        (_to_torch_main if args.command == "to-torch" else _from_torch_main)(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
