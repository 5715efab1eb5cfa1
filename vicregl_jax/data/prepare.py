"""Preparing a TFDS dataset (ArrayRecord) into a bucket, where TFDS cannot write it itself.

    python -m vicregl_jax.data.prepare imagenet2012 --data_dir=gs://BUCKET/tfds \\
        --manual_dir=gs://BUCKET/imagenet_tars --staging_dir=/mnt/disk/staging

TFDS's `download_and_prepare` fails on a gs:// data_dir in ArrayRecord format: ArrayRecord's
writer opens local files only. So the dataset is prepared by TFDS into a local staging
folder (its free space checked first), then its shards are uploaded in parallel with
retries, checked (count and sizes), and the dataset's metadata (features.json, then
dataset_info.json, which TFDS reads as "prepared") is written last: a reader never sees a
dataset whose shards are not all there (a reader asks through prepared_builder: a builder made
before dataset_info.json was written keeps the code's metadata). Run again after a kill, it
resumes: a staged dataset is not prepared again (a generation killed half-way starts over, as
TFDS's does), and the shards already in the bucket with the right size are not uploaded again.
A run with a gs:// data_dir prepares through here too, on process 0 (vicregl_jax.data.sources).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import os
import re
import shutil
import sys
import time

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

STAGING_ENV = "VICREGL_JAX_STAGING_DIR"
SHARD = re.compile(r"\.(array_record|tfrecord|riegeli|parquet)-\d{5}-of-\d{5}$")
# Written in this order, after every shard: TFDS takes a folder with both for a dataset.
METADATA_LAST = ("features.json", "dataset_info.json")
UPLOAD_WORKERS = 16
UPLOAD_TRIES = 5
UPLOAD_BACKOFF_S = 1.0  # doubled after each failed try
# The prepared ArrayRecord files hold the images as they come (ImageNet: 147 GB of tars make
# 155 GB): the staging folder needs about the manual files' size, and some room.
STAGING_MARGIN = 1.15


class NotEnoughSpaceError(OSError):
    """The staging folder's disk cannot hold the prepared dataset."""


@dataclasses.dataclass(frozen=True)
class UploadReport:
    """What one upload did: shard files sent, found already in the bucket, and metadata files."""

    uploaded: tuple[str, ...]
    skipped: tuple[str, ...]
    metadata: tuple[str, ...]


def is_remote(path) -> bool:
    """Returns whether path is a URL (gs://, s3://, ...) rather than a local path."""
    return "://" in str(path)


def builder_spec(builder) -> str:
    """Returns 'name[/config][:version]' of a TFDS builder: what tfds.builder() takes back
    (the version only when it is not the default one)."""
    config = f"/{builder.builder_config.name}" if builder.builder_config else ""
    # tfds.builder() given a version first looks for the files, and a gs:// folder that does
    # not exist yet raises there (TFDS catches only its own not-found error).
    default = str(type(builder).VERSION) if getattr(type(builder), "VERSION", None) else None
    version = "" if str(builder.version) == default else f":{builder.version}"
    return f"{builder.name}{config}{version}"


def prepared_builder(builder):
    """Returns a builder of `builder`'s dataset that read its prepared folder's metadata, or None
    when that folder is not prepared (yet)."""
    if not builder.is_prepared():
        return None
    # is_prepared() looks at the folder now, but a builder reads dataset_info.json once, when
    # made: one made just before a preparation wrote it holds the code's metadata (TFRecord, no
    # split sizes) and cannot open the ArrayRecord shards. Made again, it reads the file found.
    return tfds.builder(builder_spec(builder), data_dir=str(builder.data_dir_root))


def default_staging_dir() -> str:
    """Returns $VICREGL_JAX_STAGING_DIR, else ~/.cache/vicregl_jax/tfds_staging."""
    return os.environ.get(STAGING_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "vicregl_jax", "tfds_staging")


def tree_size(path: str | None) -> int:
    """Returns the bytes of the files under path (local or gs://; 0 when it is missing or None)."""
    if not path or not tf.io.gfile.exists(path):
        return 0
    if not tf.io.gfile.isdir(path):
        return tf.io.gfile.stat(path).length
    return sum(
        tf.io.gfile.stat(os.path.join(top, name)).length for top, _, files in tf.io.gfile.walk(path) for name in files
    )


def staging_space_needed(builder, manual_dir: str | None) -> int:
    """Returns the bytes the staging folder needs to prepare builder's dataset."""
    known = int(builder.info.dataset_size or 0) + int(builder.info.download_size or 0)
    return int(max(known, tree_size(manual_dir)) * STAGING_MARGIN)


def check_staging_space(staging_dir: str, needed: int) -> None:
    """Raises NotEnoughSpaceError, naming the space needed and how to move staging, when the
    disk of staging_dir has less than `needed` bytes free."""
    os.makedirs(staging_dir, exist_ok=True)
    free = shutil.disk_usage(staging_dir).free
    if free < needed:
        raise NotEnoughSpaceError(
            f"preparing needs {needed / 2**30:.1f} GiB in the staging folder {staging_dir}, which has "
            f"{free / 2**30:.1f} GiB free: give a folder on a larger disk with --staging_dir=DIR "
            f"(in a run: ${STAGING_ENV}=DIR)."
        )


@contextlib.contextmanager
def file_lock(folder: str, filename: str):
    """Holds an exclusive flock on the file `filename` in `folder` (created), for processes of one machine."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, filename), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _staging_lock(staging_dir: str, name: str):
    """Returns an exclusive lock on one dataset's staging (two preparations on one machine)."""
    return file_lock(staging_dir, f".{name.replace('/', '_')}.staging.lock")


def stage(dataset: str, staging_dir: str, manual_dir: str | None, num_shards: int | None = None):
    """Returns the builder of `dataset` prepared (ArrayRecord) in staging_dir, preparing it
    there unless a former preparation did."""
    local = tfds.builder(dataset, data_dir=staging_dir)
    if local.is_prepared():
        return local
    check_staging_space(staging_dir, staging_space_needed(local, manual_dir))
    # A generation killed half-way leaves TFDS's temporary folder behind: it is redone.
    for leftover in local.data_path.parent.glob("incomplete.*"):
        logging.info("Removing %s, left by a killed preparation.", leftover)
        shutil.rmtree(os.fspath(leftover), ignore_errors=True)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, num_shards=num_shards)
    local.download_and_prepare(download_config=config, file_format="array_record")
    return local


def _with_retries(action, what: str, tries: int, backoff_s: float):
    for attempt in range(tries):
        try:
            return action()
        except (tf.errors.OpError, OSError) as error:
            if (
                isinstance(error, (tf.errors.NotFoundError, tf.errors.PermissionDeniedError, FileNotFoundError))
                or attempt == tries - 1
            ):
                raise OSError(f"{what} failed after {attempt + 1} tries: {error}") from error
            logging.warning("%s failed (%s); retrying in %.1f s.", what, error, backoff_s * 2**attempt)
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def _remote_sizes(remote_dir: str) -> dict[str, int]:
    """Returns {file name: size} of the files directly in remote_dir ({} when it is missing)."""
    if not tf.io.gfile.isdir(remote_dir):
        return {}
    names = [n for n in tf.io.gfile.listdir(remote_dir) if not n.endswith("/")]
    return {n: tf.io.gfile.stat(os.path.join(remote_dir, n)).length for n in names}


def upload_prepared(
    local_dir: str,
    remote_dir: str,
    *,
    workers: int = UPLOAD_WORKERS,
    tries: int = UPLOAD_TRIES,
    backoff_s: float = UPLOAD_BACKOFF_S,
) -> UploadReport:
    """Uploads a prepared TFDS dataset folder to remote_dir: the shards in parallel (each one
    not already there with the right size), checked, then the other files, features.json and
    dataset_info.json last. Returns what it did; raises OSError when a shard stays missing."""
    names = sorted(n for n in os.listdir(local_dir) if os.path.isfile(os.path.join(local_dir, n)))
    shards = [n for n in names if SHARD.search(n)]
    if not shards:
        raise OSError(f"{local_dir} holds no dataset shards: it is not a prepared TFDS dataset.")
    local_size = {n: os.path.getsize(os.path.join(local_dir, n)) for n in names}
    present = _remote_sizes(remote_dir)
    todo = [n for n in shards if present.get(n) != local_size[n]]
    tf.io.gfile.makedirs(remote_dir)

    def upload(name):
        _with_retries(
            lambda: tf.io.gfile.copy(os.path.join(local_dir, name), os.path.join(remote_dir, name), overwrite=True),
            f"uploading {name}",
            tries,
            backoff_s,
        )
        return name

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, name in enumerate(pool.map(upload, todo), 1):
            logging.info("Uploaded %s (%d of %d, %.0f s).", name, done, len(todo), time.monotonic() - started)
    uploaded = _remote_sizes(remote_dir)
    wrong = [n for n in shards if uploaded.get(n) != local_size[n]]
    if wrong:
        raise OSError(
            f"{len(wrong)} of {len(shards)} shards are missing in {remote_dir} or differ in size after "
            f"the upload (e.g. {wrong[0]}); run the same command again to finish it."
        )
    others = [n for n in names if n not in shards and n not in METADATA_LAST]
    last = [n for n in METADATA_LAST if n in local_size]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(upload, others))
    for name in last:  # one after the other: dataset_info.json is the very last object
        upload(name)
    return UploadReport(tuple(todo), tuple(n for n in shards if n not in todo), tuple(others + last))


def _upload_dataset_files(local_root: str, remote_root: str, variant: str, **kwargs) -> UploadReport:
    """Uploads the files of one dataset's folder that are not in its variant (version) folder
    (TFDS's .config/metadata.json), then the variant folder (upload_prepared)."""
    for top, _, files in os.walk(local_root):
        rel = os.path.relpath(top, local_root)
        if rel == variant or rel.startswith(variant + os.sep) or os.path.basename(top).startswith("incomplete."):
            continue
        for name in files:
            tf.io.gfile.makedirs(os.path.join(remote_root, rel))
            tf.io.gfile.copy(os.path.join(top, name), os.path.join(remote_root, rel, name), overwrite=True)
    return upload_prepared(os.path.join(local_root, variant), os.path.join(remote_root, variant), **kwargs)


def prepare_to_bucket(
    dataset: str,
    data_dir: str,
    manual_dir: str | None = None,
    *,
    staging_dir: str | None = None,
    workers: int = UPLOAD_WORKERS,
    num_shards: int | None = None,
):
    """Returns the builder of `dataset` ('name[/config][:version]') prepared in data_dir
    (gs://...), preparing it in staging_dir and uploading it unless it is there already."""
    remote = tfds.builder(dataset, data_dir=data_dir)
    prepared = prepared_builder(remote)
    if prepared is not None:
        print(f"vicregl_jax: {dataset} is prepared in {remote.data_path} already.", flush=True)
        return prepared
    staging_dir = os.path.abspath(staging_dir or default_staging_dir())
    with _staging_lock(staging_dir, remote.name):
        local = stage(dataset, staging_dir, manual_dir, num_shards)
        local_root = os.path.join(staging_dir, remote.name)
        variant = os.path.relpath(os.fspath(local.data_path), local_root)
        remote_root = os.path.join(str(remote.data_dir_root), remote.name)
        report = _upload_dataset_files(local_root, remote_root, variant, workers=workers)
    logging.info(
        "%s: uploaded %d shards (%d were there already) and %d metadata files to %s.",
        dataset,
        len(report.uploaded),
        len(report.skipped),
        len(report.metadata),
        remote.data_path,
    )
    print(
        f"vicregl_jax: {dataset} is prepared in {remote.data_path} ({len(report.uploaded)} shards uploaded, "
        f"{len(report.skipped)} already there).",
        flush=True,
    )
    return tfds.builder(dataset, data_dir=data_dir)


def main(argv=None) -> None:
    """Prepares the dataset named on the command line into --data_dir (a bucket or a local folder)."""
    parser = argparse.ArgumentParser(prog="python -m vicregl_jax.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("dataset", help="TFDS name, e.g. imagenet2012 or imagenette/full-size-v2")
    parser.add_argument("--data_dir", required=True, help="where the prepared dataset goes (gs://BUCKET/tfds or local)")
    parser.add_argument("--manual_dir", help="the files downloaded by hand (local or gs://), if the dataset needs them")
    parser.add_argument(
        "--staging_dir",
        help=f"local folder to prepare in before the upload (default: ${STAGING_ENV} "
        "or ~/.cache/vicregl_jax/tfds_staging)",
    )
    parser.add_argument("--upload_workers", type=int, default=UPLOAD_WORKERS, help="shards uploaded at once")
    parser.add_argument("--num_shards", type=int, help="shards per split (default: TFDS's choice by size)")
    args = parser.parse_args(argv)
    try:
        if is_remote(args.data_dir):
            prepare_to_bucket(
                args.dataset,
                args.data_dir,
                args.manual_dir,
                staging_dir=args.staging_dir,
                workers=args.upload_workers,
                num_shards=args.num_shards,
            )
        else:
            with _staging_lock(args.data_dir, args.dataset):
                stage(args.dataset, args.data_dir, args.manual_dir, args.num_shards)
    except (NotEnoughSpaceError, OSError, ValueError, AssertionError) as error:
        sys.exit(f"error: {' '.join(str(error).split())}")


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)  # the progress of the upload
    main()
