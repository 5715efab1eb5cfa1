"""What the pre-training pipeline asks of a bucket: requests per image, bytes per request and
images/s per host, for block reads (the default read_block / shuffle_window) and for one
record per read (read_block=1), against the Storage emulator on loopback.

    python benchmarks/storage_bench.py                      # 2048 images of ~110 KB, host 0 of 8
    python benchmarks/storage_bench.py --images=8192 --hosts=2 --windows=6

A TFDS dataset of JPEGs the size of ImageNet's (noise at quality 75, ~110 KB each) is prepared
into gs:// by vicregl_jax.data.prepare (staged locally, uploaded, as for ImageNet), then read by
make_pretrain_iterator as host 0 of --hosts. Every client reaches the emulator through its
loopback proxy, which counts ArrayRecord's data reads and the bytes of their responses (the
data requests) apart from every other request (TensorFlow's reads of the dataset's metadata).
Bytes per image include what each open-ended ranged read (`Range: bytes=N-`, as
google-cloud-cpp asks) streams past the records it wanted before the reader drops it: on
loopback that is a socket's buffer, on a real bucket it is billed egress. Images/s on loopback
measure the pipeline, not a network: read them for the ratio only.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import common  # noqa: F401  (the repository root on the path)
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from vicregl_jax.data import CropGroup, ReadOptions, make_pretrain_iterator, prepare
from vicregl_jax.data.options import DEFAULT_READ_BLOCK, DEFAULT_SHUFFLE_WINDOW, resolve_hosts
from vicregl_jax.data.stream import window_size
from vicregl_jax.storage_emulator import StorageEmulator

BUCKET = "vicregl-storage-bench"
DISTINCT = 64  # distinct JPEGs, repeated: the bytes of ImageNet's records without encoding thousands


class StorageBenchImages(tfds.core.GeneratorBasedBuilder):
    """Noise JPEGs of ImageNet's size (~110 KB), with a label, for measuring reads."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=f"n{n}") for n in (1024, 2048, 4096, 8192)]

    def _info(self):
        features = tfds.features.FeaturesDict(
            {"image": tfds.features.Image(encoding_format="jpeg"), "label": tfds.features.ClassLabel(num_classes=10)}
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(int(self.builder_config.name[1:]))}

    def _generate_examples(self, count):
        rng = np.random.default_rng(0)
        jpegs = []
        for _ in range(DISTINCT):
            out = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (380, 480, 3), dtype=np.uint8)).save(out, "JPEG", quality=75)
            jpegs.append(out.getvalue())
        for i in range(count):
            yield i, {"image": jpegs[i % DISTINCT], "label": i % 10}


def measure(name: str, data_dir: str, emulator: StorageEmulator, args, read_block: int) -> dict:
    """Returns the requests, bytes and time of reading batches as host 0 of args.hosts, counted in
    steady state: from the end of the first window's steps over args.windows windows' steps (the
    windows read ahead are the same number at both ends), args.steps_one_record steps for read_block 1."""
    read = ReadOptions(
        data_dir=data_dir,
        process_index=0,
        process_count=args.hosts,
        read_block=read_block,
        shuffle_window=args.shuffle_window,
    )
    hosts = resolve_hosts(args.local_batch * args.hosts, 0, args.hosts)
    steps_per_window = window_size(read_block, read, hosts) // args.local_batch
    warmup, steps = (
        (steps_per_window, args.windows * steps_per_window) if read_block > 1 else (2, args.steps_one_record)
    )
    groups = (CropGroup(64, 2, (0.3, 1.0)),)  # small views: the reads, not the resizing, are measured
    started = time.perf_counter()
    it = make_pretrain_iterator(
        name, "train", groups=groups, global_batch_size=args.local_batch * args.hosts, seed=0, read=read
    )
    for _ in range(warmup):
        next(it)
    warm = time.perf_counter()
    before, all_before = emulator.traffic("arrayrecord"), emulator.traffic()
    for _ in range(steps):
        next(it)
    done = time.perf_counter()
    data = emulator.traffic("arrayrecord") - before
    requests, read_bytes = data.reads, data.read_bytes
    other_requests = (emulator.traffic() - all_before).requests - data.reads
    it.close()
    return {
        "read_block": read_block,
        "window": window_size(read_block, read, hosts),
        "images": steps * args.local_batch,
        "requests": requests,
        "bytes": read_bytes,
        "metadata_requests": other_requests,
        "warmup_s": warm - started,
        "images_per_s": steps * args.local_batch / (done - warm),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2048, choices=(1024, 2048, 4096, 8192))
    parser.add_argument("--hosts", type=int, default=8, help="hosts of the simulated pod (this process is host 0)")
    parser.add_argument("--local_batch", type=int, default=64)
    parser.add_argument("--windows", type=int, default=4, help="windows of steps measured with block reads")
    parser.add_argument("--steps_one_record", type=int, default=8, help="steps measured with read_block 1")
    parser.add_argument("--shuffle_window", type=int, default=DEFAULT_SHUFFLE_WINDOW)
    parser.add_argument("--read_blocks", default=f"{DEFAULT_READ_BLOCK},1", help="comma-separated settings")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as staging, StorageEmulator([BUCKET]) as emulator:
        emulator.apply()
        data_dir = f"gs://{BUCKET}/tfds"
        name = f"storage_bench_images/n{args.images}"
        started = time.perf_counter()
        builder = prepare.prepare_to_bucket(name, data_dir, staging_dir=staging)
        shard_bytes = sum(
            os.path.getsize(os.path.join(top, f))
            for top, _, files in os.walk(staging)
            for f in files
            if "array_record" in f
        )
        record_bytes = shard_bytes / builder.info.splits["train"].num_examples
        print(
            f"prepared {name} into {data_dir} in {time.perf_counter() - started:.0f} s: "
            f"{record_bytes / 1e3:.1f} KB a record"
        )
        rows = [measure(name, data_dir, emulator, args, int(b)) for b in args.read_blocks.split(",")]

    print(
        f"\nhost 0 of {args.hosts}, local batch {args.local_batch}, shuffle_window {args.shuffle_window}, "
        f"{args.images} images of {record_bytes / 1e3:.1f} KB, counted in steady state\n"
    )
    header = (
        "| read_block | window | images | data requests | requests/image | KB/request | KB/image "
        "| x record | images/s | warm-up s | metadata requests |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        per_image = row["requests"] / row["images"]
        print(
            f"| {row['read_block']} | {row['window']} | {row['images']} | {row['requests']} | "
            f"{per_image:.4f} (1/{1 / per_image:.0f}) | "
            f"{row['bytes'] / max(row['requests'], 1) / 1e3:.0f} | {row['bytes'] / row['images'] / 1e3:.1f} | "
            f"{row['bytes'] / row['images'] / record_bytes:.2f} | {row['images_per_s']:.0f} | "
            f"{row['warmup_s']:.1f} | {row['metadata_requests']} |"
        )
    if len(rows) >= 2 and rows[-1]["requests"]:
        ratio = (rows[0]["requests"] / rows[0]["images"]) / (rows[-1]["requests"] / rows[-1]["images"])
        print(
            f"\nrequests per image, read_block {rows[0]['read_block']} / read_block {rows[-1]['read_block']}: "
            f"1/{1 / ratio:.0f}"
        )


if __name__ == "__main__":
    main()
