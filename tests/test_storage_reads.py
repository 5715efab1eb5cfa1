"""Block reads on a bucket (the Storage emulator): a run of consecutive ArrayRecord records is one
request, lone records one request each, and the pre-training pipeline asks for 1/B of the
requests of one record per read, with the same records."""

import numpy as np
import pytest
from storage_fixture import BUCKET

from vicregl_jax.data import CropGroup, ReadOptions, make_pretrain_iterator, prepare, sources

DATASET = "vicregl_digits"  # 1498 PNGs of 32 x 32 in one shard: quick to prepare, to read and to decode


@pytest.fixture(scope="module")
def bucket_data(storage_emulator, tmp_path_factory):
    """(data_dir on the emulator holding DATASET, the local folder it was prepared in)."""
    data_dir, staging = f"gs://{BUCKET}/reads_tfds", str(tmp_path_factory.mktemp("staging"))
    prepare.prepare_to_bucket(DATASET, data_dir, staging_dir=staging)
    return data_dir, staging


class DataReads:
    """ArrayRecord's traffic through the emulator's proxy since the last reset()."""

    def __init__(self, emulator):
        self.emulator = emulator
        self.reset()

    def reset(self):
        self.before = self.emulator.traffic("arrayrecord")

    @property
    def traffic(self):
        return self.emulator.traffic("arrayrecord") - self.before

    @property
    def reads(self):
        return self.traffic.reads


def test_runs_of_records_are_one_request_each_and_read_the_same_records(storage_emulator, bucket_data):
    data_dir, staging = bucket_data
    counter = DataReads(storage_emulator)
    source = sources.tfds_source(DATASET, "train", data_dir=data_dir)
    local = sources.tfds_source(DATASET, "train", data_dir=staging)  # the same files, on disk
    source.read_records([0, 1])  # opens the shard's range reader (its footer: one request)
    source.read_records([5])  # and TFDS's random-access reader
    counter.reset()
    run = list(range(100, 164))
    records, _, errors = source.read_records(run[::-1])  # any order: one run
    assert counter.reads == 1 and errors == [None] * 64
    # The block's bytes passed the proxy (more may: the open-ended range streams on until dropped).
    assert counter.traffic.read_bytes >= sum(map(len, records)) and counter.traffic.requests == 1
    assert records == local.read_records(run[::-1])[0]
    counter.reset()
    scattered = [900, 7, 400, 1300]
    assert source.read_records(scattered)[0] == local.read_records(scattered)[0]
    assert counter.reads == 4  # lone records: one request each, as TFDS reads them
    counter.reset()
    mixed = [10, 11, 12, 500, 13, 1000, 1001]  # runs 10..13 and 1000..1001, 500 alone
    assert source.read_records(mixed)[0] == local.read_records(mixed)[0]
    assert counter.reads == 3


def test_the_pipeline_reads_a_bucket_in_blocks_with_a_request_per_block(storage_emulator, bucket_data):
    data_dir, _ = bucket_data
    counter = DataReads(storage_emulator)
    counts = {}
    for block in (32, 1):
        read = ReadOptions(data_dir=data_dir, process_index=0, process_count=2, read_block=block, shuffle_window=128)
        it = make_pretrain_iterator(
            DATASET, "train", groups=(CropGroup(16, 2, (0.5, 1.0)),), stride=16, global_batch_size=32, seed=0, read=read
        )
        next(it)  # the shard's readers opened; with blocks, the windows of steps 0-7 and 8-15 read
        counter.reset()
        labels = [next(it)["label"] for _ in range(8)]
        counts[block] = counter.reads
        it.close()
        assert np.concatenate(labels).min() >= 0  # real digits, none replaced by the placeholder
    # Blocks: windows of 128 (8 steps of 16) read as 128 / 32 = 4 blocks, one more when a block
    # straddles the window's edge (1498 is no multiple of 32), and one window read ahead.
    assert counts[32] <= 2 * (128 // 32 + 2)
    assert counts[1] >= 6 * 16  # a request per image (give or take the reads ahead at both ends)
    assert counts[32] * 8 <= counts[1]
