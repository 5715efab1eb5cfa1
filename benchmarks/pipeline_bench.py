"""Host images per CPU-second on one pinned core: this pipeline, an earlier revision, the release.

    python benchmarks/pipeline_bench.py [--core N] [--rounds 3] [--baseline 4d00eec]

Makes 64 JPEGs of 500 x 375 (a quarter in portrait) from the embedded photos, then for each
recipe (2 x 224; 2 x 224 + 6 x 96), in alternating rounds, runs each of these in a fresh
process pinned to the same single core:
- host: `make_pretrain_iterator` (colour="device": decode the crops' region, crop, resize,
  uint8 views + colour draws), num_threads 1, batches of 32, steady state;
- before: the same call on the package of git revision --baseline (default: the revision
  before the uint8 host path; colour on the host, float32 views), extracted with git archive;
- release: `references.pil.ReleaseMultiCrop`, the release's transform chain one image at a time
  in one thread (its DataLoader workers run one per core), not collated into batches;
- colour: `colour.augment_views` jitted on XLA:CPU, one batch of 32 of the recipe's views (the
  work the accelerator now does), in ms per batch;
- resize: ms per view of the recipe's crops (drawn as the pipeline draws them from the 64
  JPEGs) resized by Pillow (crop + resize, as the release), by `tf.image.resize` (antialiased,
  64 views per graph call) and by the compiled kernel of `data/resample.py` (one call per view);
  the kernel's bytes are checked equal to Pillow's on the way.
Rates are images per CPU-second of the process (user + system of all its threads: robust to
other load on the machine), best of the rounds; cores per 1,000 images/s = 1000 / rate.
Bytes per sample are what a host sends to the devices per image (views, grids, draws, label).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ("2 x 224", "2 x 224 + 6 x 96")
BATCH = 32


def make_jpegs(directory: str, count: int = 64, seed: int = 0) -> list[bytes]:
    """Writes `count` JPEGs of ~500 x 375 (crops of the embedded photos); returns their bytes."""
    import numpy as np
    from PIL import Image

    from vicregl_jax.data.embedded import natural_photos

    rng = np.random.default_rng(seed)
    photos = [p for _, p in natural_photos()]
    encoded = []
    for k in range(count):
        photo = photos[k % len(photos)]
        h, w = photo.shape[:2]
        fraction = rng.uniform(0.6, 1.0)
        ch, cw = int(h * fraction), int(w * fraction)
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        size = (500, 375) if k % 4 else (375, 500)  # a quarter in portrait, as in ImageNet
        image = Image.fromarray(photo[top : top + ch, left : left + cw]).resize(size, Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
        with open(os.path.join(directory, f"{k:03d}.jpg"), "wb") as f:
            f.write(buffer.getvalue())
    return encoded


def cpu_seconds() -> float:
    """Returns the CPU time (user + system) of this process, all threads, so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _groups(recipe: str):
    from vicregl_jax.data import CONVNEXT_GROUPS, RESNET_GROUPS

    return RESNET_GROUPS if recipe == RECIPES[0] else CONVNEXT_GROUPS


def _bytes_per_sample(batch) -> int:
    import jax

    return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(batch)) // BATCH


def worker(kind: str, recipe: str, folder: str, batches: int, images: int) -> dict:
    """Measures one kind on one recipe in this (pinned) process; returns its figures."""
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    groups = _groups(recipe)
    if kind in ("host", "before"):
        from vicregl_jax import data

        common = dict(groups=groups, global_batch_size=BATCH, seed=0)
        if hasattr(data, "ReadOptions"):
            iterator = data.make_pretrain_iterator(
                f"folder:{folder}",
                "train",
                **common,
                read=data.ReadOptions(process_index=0, process_count=1, num_threads=1),
            )
        else:  # the earlier revision's signature
            iterator = data.make_pretrain_iterator(
                f"folder:{folder}", "train", **common, process_index=0, process_count=1, num_threads=1
            )
        first = next(iterator)  # trace and compile
        for _ in range(3):
            next(iterator)
        cpu, wall = cpu_seconds(), time.perf_counter()
        for _ in range(batches):
            next(iterator)
        cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
        return {"rate": batches * BATCH / cpu, "wall_rate": batches * BATCH / wall, "bytes": _bytes_per_sample(first)}
    if kind == "release":
        import torch

        from references.pil import ReleaseMultiCrop

        torch.set_num_threads(1)
        torch.manual_seed(0)
        np.random.seed(0)
        encoded = [open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))]
        transform = ReleaseMultiCrop(groups)
        transform(encoded[0])
        cpu, wall = cpu_seconds(), time.perf_counter()
        for k in range(images):
            transform(encoded[k % len(encoded)])
        cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
        return {"rate": images / cpu, "wall_rate": images / wall}
    if kind == "colour":
        import jax

        from vicregl_jax.data import augment, colour

        rng = np.random.default_rng(0)
        args = []
        for k, group in enumerate(groups):
            views = rng.integers(0, 256, (BATCH, group.count, group.size, group.size, 3), dtype=np.uint8)
            draws = augment.sample_colour_params(tf.constant([k, 0], tf.int64), BATCH * group.count)
            draws = {
                key: np.reshape(v.numpy(), (BATCH, group.count, -1) if key == "order" else (BATCH, group.count))
                for key, v in draws.items()
            }
            args.append((views, draws))
        chain = jax.jit(lambda a: [colour.augment_views(v, d) for v, d in a])
        jax.block_until_ready(chain(args))
        repeats = 5
        cpu = cpu_seconds()
        for _ in range(repeats):
            jax.block_until_ready(chain(args))
        return {"ms_per_batch": (cpu_seconds() - cpu) / repeats * 1e3}
    if kind == "resize":
        return _resize_worker(groups, folder)
    raise ValueError(kind)


def _resize_worker(groups, folder: str) -> dict:
    """Returns {size: {"pillow", "tensorflow", "compiled": ms per view}} for the recipe's crops."""
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    from vicregl_jax.data import crops, resample

    images = [np.asarray(Image.open(os.path.join(folder, name)).convert("RGB")) for name in sorted(os.listdir(folder))]
    out = {}
    for k, group in enumerate(groups):
        views = []  # (image, box) pairs
        for i, image in enumerate(images):
            boxes = crops.sample_crop_boxes(
                tf.constant([i, k], tf.int64), image.shape[0], image.shape[1], group.count, group.scale
            ).numpy()
            views += [(image, box) for box in boxes]
        no_flip = np.zeros(1, bool)

        def pillow():
            return [
                np.asarray(
                    Image.fromarray(im).crop((left, t, left + w, t + h)).resize((group.size, group.size), Image.BICUBIC)
                )
                for im, (t, left, h, w) in views
            ]

        def compiled():
            return [resample.crop_resize(im, box[None], no_flip, group.size, 0)[0] for im, box in views]

        cropped = [tf.constant(im[t : t + h, left : left + w]) for im, (t, left, h, w) in views]
        chunks = [cropped[j : j + 64] for j in range(0, len(cropped), 64)]
        tf_resize = tf.function(
            lambda xs: [tf.image.resize(x, [group.size, group.size], "bicubic", antialias=True) for x in xs]
        )

        def tensorflow():
            return [tf_resize(chunk) for chunk in chunks]

        for want, got in zip(pillow(), compiled()):
            np.testing.assert_array_equal(got, want)
        figures = {}
        for name, fn in (("pillow", pillow), ("tensorflow", tensorflow), ("compiled", compiled)):
            fn()
            best = float("inf")
            for _ in range(3):
                cpu = cpu_seconds()
                fn()
                best = min(best, cpu_seconds() - cpu)
            figures[name] = best / len(views) * 1e3
        out[group.size] = figures
    return out


def _run(kind, recipe, folder, core, args, pythonpath) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        kind,
        "--recipe",
        recipe,
        "--folder",
        folder,
        "--core",
        str(core),
        "--batches",
        str(args.batches),
        "--images",
        str(args.images),
    ]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{kind} / {recipe} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--core", type=int, default=None, help="the CPU core to pin to (default: the last one usable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=6, help="timed batches of 32 per round (host, before)")
    parser.add_argument("--images", type=int, default=48, help="timed images per round (release)")
    parser.add_argument("--baseline", default="4d00eec", help="git revision measured as 'before'")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--recipe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    core = args.core if args.core is not None else sorted(os.sched_getaffinity(0))[-1]
    if args.worker:
        os.sched_setaffinity(0, [core])  # before TensorFlow, JAX or torch start their threads
        print(json.dumps(worker(args.worker, args.recipe, args.folder, args.batches, args.images)), flush=True)
        return

    sys.path.insert(0, ROOT)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "jpegs")
        os.makedirs(folder)
        make_jpegs(folder)
        baseline = os.path.join(tmp, "baseline")
        os.makedirs(baseline)
        archive = subprocess.run(
            ["git", "-C", ROOT, "archive", args.baseline, "vicregl_jax"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", baseline], input=archive.stdout, check=True)
        paths = {"host": ROOT, "before": baseline, "release": ROOT, "colour": ROOT, "resize": ROOT}
        for r in range(args.rounds):
            for recipe in RECIPES:
                for kind in ("host", "before", "release") + (("colour", "resize") if r == 0 else ()):
                    figures = _run(kind, recipe, folder, core, args, paths[kind])
                    results.setdefault((recipe, kind), []).append(figures)
                    print(f"round {r} {recipe} {kind}: {figures}", flush=True)

    def best(recipe, kind, key="rate"):
        return max(f[key] for f in results[(recipe, kind)])

    load = os.getloadavg()[0]
    print(
        f"\nhost images per CPU-second, one core pinned (core {core}), batches of {BATCH}, best of "
        f"{args.rounds} rounds; load average {load:.1f} on {os.cpu_count()} cores; before = {args.baseline}\n"
    )
    print(
        "| recipe | this pipeline | before | release (PIL) | this / release | before / release "
        "| cores per 1,000 images/s (before -> now) | bytes per sample to devices (before -> now) "
        "| colour on the device, XLA:CPU, per batch of 32 |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---|---:|")
    for recipe in RECIPES:
        host, before, release = best(recipe, "host"), best(recipe, "before"), best(recipe, "release")
        bytes_now = results[(recipe, "host")][0]["bytes"]
        bytes_before = results[(recipe, "before")][0]["bytes"]
        colour_ms = results[(recipe, "colour")][0]["ms_per_batch"]
        print(
            f"| {recipe} | {host:.0f} | {before:.0f} | {release:.0f} | {host / release:.2f}x | "
            f"{before / release:.2f}x | {1000 / before:.1f} -> {1000 / host:.1f} | "
            f"{bytes_before / 1e6:.2f} MB -> {bytes_now / 1e6:.2f} MB ({bytes_before / bytes_now:.1f}x fewer) | "
            f"{colour_ms:.0f} ms |"
        )
    print(
        "\nresize, ms per view on the same core (Pillow: crop + resize as the release; tf.image.resize "
        "antialiased; compiled: data/resample.py, Pillow's bytes)\n"
    )
    print("| recipe | view | Pillow | tf.image.resize | compiled | compiled vs Pillow | compiled vs TF |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for recipe in RECIPES:
        for size, f in results[(recipe, "resize")][0].items():
            print(
                f"| {recipe} | {size} | {f['pillow']:.3f} | {f['tensorflow']:.3f} | {f['compiled']:.3f} | "
                f"{f['pillow'] / f['compiled']:.1f}x | {f['tensorflow'] / f['compiled']:.1f}x |"
            )


if __name__ == "__main__":
    main()
