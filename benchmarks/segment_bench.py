"""Images per CPU-second of the segmentation input pipelines (host side, one process).

    python benchmarks/segment_bench.py [--cores 1] [--rounds 3]

Writes a Pascal VOC-layout folder of 48 JPEGs of 500 x 375 (a quarter in portrait) with palette
PNG masks, then measures, pinned to `--cores` CPU cores:
- train: `make_train_iterator` at the release's VOC settings (scale (2048, 512) x U(0.5, 2),
  crop 512 with the class-balance redraws, flip, photometric distortion), batches of 16;
- eval: `make_eval_iterator` (keep-ratio resize to (2048, 512), masks at full size).
Rates are images per CPU-second of this process (all threads: robust to other processes on
the machine) and images per wall-second divided by the cores; best of the rounds. The number
a training run needs is (steps per second) x (batch size) / (images per core-second) cores.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_voc(directory: str, count: int = 48, seed: int = 0) -> str:
    """Writes count VOC-like pairs under directory/VOC2012 (train.txt, aug.txt, val.txt)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from vicregl_jax.data.embedded import natural_photos

    rng = np.random.default_rng(seed)
    photos = [p for _, p in natural_photos()]
    base = os.path.join(directory, "VOC2012")
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    names = []
    for k in range(count):
        size = (500, 375) if k % 4 else (375, 500)
        image = Image.fromarray(photos[k % len(photos)]).resize(size, Image.BICUBIC)
        mask = Image.new("L", size, 0)
        draw = ImageDraw.Draw(mask)
        for _ in range(3):  # a few objects of random classes, VOC's 255 border around them
            x, y = int(rng.integers(0, size[0] - 100)), int(rng.integers(0, size[1] - 100))
            draw.ellipse([x, y, x + 100, y + 100], fill=int(rng.integers(1, 21)), outline=255, width=3)
        name = f"bench_{k:03d}"
        image.save(os.path.join(base, "JPEGImages", name + ".jpg"), quality=90)
        palette = Image.fromarray(np.asarray(mask), mode="P")
        palette.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        palette.save(os.path.join(base, "SegmentationClass", name + ".png"))
        mask.save(os.path.join(base, "SegmentationClassAug", name + ".png"))
        names.append(name)
    half = count // 2
    for split, part in (("train", names[:half]), ("aug", names[half:]), ("val", names)):
        with open(os.path.join(base, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
            f.write("".join(n + "\n" for n in part))
    return directory


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rate(batches, count: int) -> tuple[float, float]:
    """Returns (images per CPU-second, images per wall-second) over count batches."""
    cpu, wall, images = cpu_seconds(), time.perf_counter(), 0
    for _ in range(count):
        images += len(next(batches)["mask"])
    return images / (cpu_seconds() - cpu), images / (time.perf_counter() - wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=1, help="CPU cores to pin the process to")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=4, help="timed batches of 16 per round")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))[: args.cores]
    os.sched_setaffinity(0, cores)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(len(cores))
    tf.config.threading.set_intra_op_parallelism_threads(1)
    from vicregl_jax.data import segmentation as seg

    rows = []
    with tempfile.TemporaryDirectory() as directory:
        spec = f"voc:{write_voc(directory)}"
        train = seg.make_train_iterator(seg.open_split(spec, "trainaug"), global_batch_size=16, seed=0)
        val = seg.open_split(spec, "val")
        chunks = (
            seg.eval_chunks(seg.image_sizes(val.masks), scale=(2048, 512), images_per_chunk=16, row_multiple=1) * 20
        )

        next(train)
        train_rates, eval_rates = [], []
        for _ in range(args.rounds):
            time.sleep(2.0)  # let the prefetch buffers fill, then drain them untimed
            for _ in range(2):
                next(train)
            train_rates.append(rate(train, args.batches))
            evals = seg.make_eval_iterator(val, chunks)
            next(evals)
            eval_rates.append(rate(evals, min(args.batches, len(chunks) - 1)))
            evals.close()
        train.close()
        for name, rates in (
            ("train (crop 512, all augmentations)", train_rates),
            ("eval (resize to (2048, 512), full-size masks)", eval_rates),
        ):
            rows.append((name, max(c for c, _ in rates), max(w for _, w in rates) / len(cores)))
    load = os.getloadavg()[0]
    print(
        f"\nVOC-sized images (500 x 375) per second per CPU core ({len(cores)} core(s) pinned, "
        f"best of {args.rounds}; load average {load:.1f} on {os.cpu_count()} cores)\n"
    )
    print("| pipeline | images / CPU-s | images / wall-s / core |")
    print("|---|---|---|")
    for name, cpu, wall in rows:
        print(f"| {name} | {cpu:.1f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
