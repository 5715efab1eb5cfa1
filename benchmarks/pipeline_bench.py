"""Images per second per CPU core: the tf.data pipeline against a plain PIL reference.

    python benchmarks/pipeline_bench.py [--cores 1] [--rounds 3]

Makes 64 JPEGs of about 500 x 375 from the embedded photos, then for each recipe
(2 x 224; 2 x 224 + 6 x 96) measures, in alternating rounds in this one process pinned to
`--cores` CPU cores:
- tf.data: `make_pretrain_iterator` with num_threads = cores, batches of 32, steady state
  (the batches buffered while idle are drained before the clock starts);
- PIL: `reference_pil.pil_multi_crop`, one image at a time in one thread (the way the
  release's DataLoader workers run: one worker per core), not even collated into batches.
Per core is measured two ways: images per CPU-second of this process (user + system time
of all its threads, robust to other processes sharing the cores: the headline) and images
per wall-clock second divided by the cores. Each figure is the best of the rounds; the ratio
is tf.data / PIL.
"""
from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def time_tf(iterator, batches: int, batch_size: int) -> tuple[float, float]:
    """Returns (images per CPU-second, images per wall-second) of the iterator, steady state."""
    for _ in range(3):  # drain what was buffered while we measured something else
        next(iterator)
    cpu, wall = cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        next(iterator)
    images = batches * batch_size
    return images / (cpu_seconds() - cpu), images / (time.perf_counter() - wall)


def time_pil(encoded, groups, images: int, seed: int) -> tuple[float, float]:
    """Returns (images per CPU-second, images per wall-second) of the single-image PIL reference.

    Images are made one at a time and not collated into batches (collating would add a copy
    and hold a batch of arrays, slowing the reference further): a conservative yardstick.
    """
    import numpy as np

    from vicregl_jax.data.reference_pil import pil_multi_crop

    rng = np.random.default_rng(seed)
    cpu, wall = cpu_seconds(), time.perf_counter()
    for k in range(images):
        pil_multi_crop(encoded[k % len(encoded)], groups, rng)
    return images / (cpu_seconds() - cpu), images / (time.perf_counter() - wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=1, help="CPU cores to pin the process to")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=6, help="timed tf.data batches per round")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--pil_images", type=int, default=48, help="PIL images per round")
    args = parser.parse_args()

    cores = sorted(os.sched_getaffinity(0))[: args.cores]
    os.sched_setaffinity(0, cores)  # before TensorFlow starts its threads
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(len(cores))
    tf.config.threading.set_intra_op_parallelism_threads(1)
    from vicregl_jax.data import CONVNEXT_GROUPS, RESNET_GROUPS, make_pretrain_iterator

    recipes = {"2 x 224": RESNET_GROUPS, "2 x 224 + 6 x 96": CONVNEXT_GROUPS}
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        encoded = make_jpegs(directory)
        for name, groups in recipes.items():
            iterator = make_pretrain_iterator(
                f"folder:{directory}", "train", groups=groups, global_batch_size=args.batch_size,
                seed=0, process_index=0, process_count=1, num_threads=len(cores),
            )
            next(iterator)  # trace and compile
            tf_rates, pil_rates = [], []
            for r in range(args.rounds):
                tf_rates.append(time_tf(iterator, args.batches, args.batch_size))
                time.sleep(2.0)  # let tf.data fill its buffers and go idle
                pil_rates.append(time_pil(encoded, groups, args.pil_images, seed=r))
            # CPU-second rates are per core already; wall rates are divided by the cores used
            # (PIL runs one thread: one core).
            tf_cpu = max(c for c, _ in tf_rates)
            tf_wall = max(w for _, w in tf_rates) / len(cores)
            pil_cpu = max(c for c, _ in pil_rates)
            pil_wall = max(w for _, w in pil_rates)
            rows.append((name, tf_cpu, pil_cpu, tf_wall, pil_wall))
            tf_list = [(round(c, 1), round(w / len(cores), 1)) for c, w in tf_rates]
            print(f"{name}: tf.data {tf_list}, "
                  f"PIL {[(round(c, 1), round(w, 1)) for c, w in pil_rates]} "
                  "(images per CPU-s, per wall-s per core)", flush=True)
            del iterator

    load = os.getloadavg()[0]
    print(f"\nimages/s per CPU core ({len(cores)} core(s) pinned, batch {args.batch_size}, "
          f"best of {args.rounds} rounds; load average {load:.1f} on {os.cpu_count()} cores)\n")
    print("| recipe | tf.data (CPU time) | PIL (CPU time) | ratio "
          "| tf.data (wall) | PIL (wall) | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, tf_cpu, pil_cpu, tf_wall, pil_wall in rows:
        print(f"| {name} | {tf_cpu:.1f} | {pil_cpu:.1f} | {tf_cpu / pil_cpu:.2f}x "
              f"| {tf_wall:.1f} | {pil_wall:.1f} | {tf_wall / pil_wall:.2f}x |")


if __name__ == "__main__":
    main()
