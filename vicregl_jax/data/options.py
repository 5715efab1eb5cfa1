"""How a host reads a dataset: the options every iterator shares, and this host's share of a batch."""

from __future__ import annotations

import dataclasses
import os

from vicregl_jax.data import sources

# INTEGER_ACCURATE is libjpeg's default, hence PIL's: the same pixels as the release decodes.
JPEG_DCT_METHODS = ("INTEGER_ACCURATE", "INTEGER_FAST")
# "pillow": Pillow's resize, byte for byte, compiled (resample.py; runs in Python, so not on tf.data
# service workers); "tensorflow": tf.image.resize (float, antialiased: within a level of
# Pillow almost everywhere), TensorFlow ops only.
RESIZE_METHODS = ("pillow", "tensorflow")
# 64 records a request: 1/64 of the requests of one record each, a few MB per request on
# ImageNet. A window of 1024 examples mixes 16 blocks and holds ~110 MB of ImageNet's JPEGs.
DEFAULT_READ_BLOCK, DEFAULT_SHUFFLE_WINDOW = 64, 1024


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """Where a dataset is and how a host reads it; shared by all the iterators.

    process_index / process_count default to JAX's; num_threads to the CPUs this process may
    run on (its affinity mask, as SLURM and containers set it). max_failure_share of the last
    failure_window images may fail (unreadable or undecodable) before training stops.
    jpeg_dct_method "INTEGER_FAST" decodes a little faster, with pixels that differ from PIL's.
    resize "pillow" (default) resizes as Pillow does, byte for byte, compiled; "tensorflow" with
    TensorFlow's resize (what a tf.data service worker can run; 4-6x slower).
    Training streams read blocks of read_block consecutive records with one request each and
    shuffle within windows of shuffle_window examples per host (data/stream.py); read_block 1
    is a full shuffle per epoch with one request per example.
    """

    data_dir: str | None = None
    manual_dir: str | None = None
    process_index: int | None = None
    process_count: int | None = None
    num_threads: int | None = None
    prefetch: int = 2
    max_in_memory_bytes: int = sources.DEFAULT_MAX_IN_MEMORY_BYTES
    jpeg_dct_method: str = "INTEGER_ACCURATE"
    max_failure_share: float = 0.01
    failure_window: int = 10_000
    resize: str = "pillow"
    read_block: int = DEFAULT_READ_BLOCK
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW

    def __post_init__(self):
        if self.resize not in RESIZE_METHODS:
            raise ValueError(f"resize={self.resize!r}: use one of {RESIZE_METHODS}.")
        if self.jpeg_dct_method not in JPEG_DCT_METHODS:
            raise ValueError(f"jpeg_dct_method={self.jpeg_dct_method!r}: use one of {JPEG_DCT_METHODS}.")
        if not 0.0 <= self.max_failure_share <= 1.0:
            raise ValueError(f"max_failure_share={self.max_failure_share!r}: give a fraction in [0, 1], e.g. 0.01.")
        if self.failure_window <= 0:
            raise ValueError(f"failure_window={self.failure_window!r}: give a positive count, e.g. 10000.")
        if self.read_block < 1:
            raise ValueError(f"read_block={self.read_block!r}: give a positive count of records per read, e.g. 64.")
        if self.shuffle_window < 1:
            raise ValueError(f"shuffle_window={self.shuffle_window!r}: give a positive count of examples, e.g. 1024.")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ValueError(f"num_threads={self.num_threads!r}: give a positive count or None (all usable CPUs).")

    @classmethod
    def from_config(cls, data_config) -> ReadOptions:
        """Returns the options of a run's config.data section (data_dir, manual_dir, num_threads,
        jpeg_dct_method, max_failure_share, failure_window, resize, read_block, shuffle_window;
        absent keys keep their defaults)."""
        fields = (
            "data_dir",
            "manual_dir",
            "num_threads",
            "jpeg_dct_method",
            "max_failure_share",
            "failure_window",
            "resize",
            "read_block",
            "shuffle_window",
        )
        return cls(**{f: data_config[f] for f in fields if f in data_config})

    def threads(self) -> int:
        """Returns the number of parallel calls: num_threads, else the CPUs usable by this process."""
        return self.num_threads or len(os.sched_getaffinity(0)) or 1

    def open(self, dataset: str, split: str) -> sources.ImageSource:
        """Returns the random-access source of a dataset's split, read as these options say."""
        return sources.open_source(
            dataset,
            split,
            data_dir=self.data_dir,
            manual_dir=self.manual_dir,
            max_in_memory_bytes=self.max_in_memory_bytes,
        )


@dataclasses.dataclass(frozen=True)
class Hosts:
    """This host's share of every global batch: rows [index * local_batch, (index + 1) * local_batch)."""

    index: int
    count: int
    global_batch: int

    @property
    def local_batch(self) -> int:
        """Returns the rows of a global batch this host holds."""
        return self.global_batch // self.count


def resolve_hosts(global_batch_size: int, process_index: int | None = None, process_count: int | None = None) -> Hosts:
    """Returns this host's Hosts, checked; process index and count are JAX's when None."""
    if process_index is None or process_count is None:
        import jax  # only here: the iterators run without JAX when given both

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} is outside [0, process_count={process_count}): "
            "pass the index of this host (jax.process_index())."
        )
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not a positive multiple of "
            f"process_count={process_count}: choose a batch size that every host can share "
            f"equally (e.g. {max(1, global_batch_size // process_count) * process_count})."
        )
    return Hosts(process_index, process_count, global_batch_size)
