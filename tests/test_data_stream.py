"""The stream's order in blocks (data/stream.py), as pure functions of (seed, position): each
epoch a permutation, hosts disjoint, a window read in few runs, block 1 the full shuffle."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from vicregl_jax.data import sources, stream
from vicregl_jax.data.options import ReadOptions, resolve_hosts
from vicregl_jax.data.sources import record_runs


def example_order(num: int, block: int, window: int):
    """Returns f(positions, shuffle key) -> the examples the stream serves there (one graph)."""
    return tf.function(
        lambda positions, key: tf.map_fn(
            lambda q: stream.block_epoch_index(q, num, block, window, key), positions, fn_output_signature=tf.int64
        )
    )


def examples_at(order, positions, key) -> np.ndarray:
    """Returns order's examples at `positions` (numpy) for a shuffle key."""
    return order(tf.constant(positions, tf.int64), tf.constant(key, tf.int64)).numpy()


def served_positions(hosts_count: int, local: int, window: int, rounds: int) -> np.ndarray:
    """Returns (rounds, hosts, window) positions that each host serves in rounds 0 .. rounds - 1."""
    hosts = [resolve_hosts(hosts_count * local, h, hosts_count) for h in range(hosts_count)]
    return np.stack([[stream.window_host_positions(r, host, window) for host in hosts] for r in range(rounds)])


CASES = [
    # (examples, hosts, local batch, read_block, shuffle_window); then random ones.
    (76, 1, 32, 64, 1024),  # the demo: one full block and a partial one, a window of 13 epochs
    (24, 2, 4, 4, 12),
    (1000, 4, 8, 64, 64),
    (97, 3, 5, 7, 20),  # no size divides another
    (5, 2, 3, 8, 4),  # blocks larger than the dataset
    (50, 1, 10, 1, 1),  # one record a read
]
rng = np.random.default_rng(20)
CASES += [
    (
        int(rng.integers(1, 400)),
        int(rng.integers(1, 5)),
        int(rng.integers(1, 9)),
        int(rng.integers(1, 70)),
        int(rng.integers(1, 200)),
    )
    for _ in range(6)
]


@pytest.mark.parametrize("num,hosts_count,local,block,shuffle_window", CASES)
def test_every_epoch_is_a_permutation_served_once_by_disjoint_hosts(num, hosts_count, local, block, shuffle_window):
    read = ReadOptions(process_index=0, process_count=hosts_count, read_block=block, shuffle_window=shuffle_window)
    window = stream.window_size(block, read, resolve_hosts(hosts_count * local, 0, hosts_count))
    assert window % local == 0 and window >= min(shuffle_window, local) and (block > 1 or window == local)
    steps_per_round = window // local
    rounds = -(-3 * num // (hosts_count * window)) + 1  # past three epochs
    positions = served_positions(hosts_count, local, window, rounds)
    flat = np.sort(positions.ravel())
    np.testing.assert_array_equal(flat, np.arange(len(flat)))  # hosts disjoint, no position skipped
    # Step t of a host: its slice of the window of round t // (window / local).
    last = resolve_hosts(hosts_count * local, hosts_count - 1, hosts_count)
    for step in (0, steps_per_round - 1, steps_per_round * rounds - 1):
        got = stream.step_positions(step, last, window)
        u = step % steps_per_round
        np.testing.assert_array_equal(got, positions[step // steps_per_round, -1, u * local : (u + 1) * local])
    seed = int(rng.integers(0, 2**31))
    key = stream.StreamKeys.of_seed(seed).shuffle
    order = example_order(num, block, window)
    served = examples_at(order, np.arange(len(flat)), key)
    epochs = len(flat) // num
    assert epochs >= 3
    for e in range(epochs):
        np.testing.assert_array_equal(np.sort(served[e * num : (e + 1) * num]), np.arange(num))
    # Deterministic: the same examples when computed again, other ones for another seed.
    np.testing.assert_array_equal(examples_at(order, np.arange(num), key), served[:num])
    if num > 3:
        other = examples_at(order, np.arange(num), stream.StreamKeys.of_seed(seed + 1).shuffle)
        assert not np.array_equal(other, served[:num])
    # A window is read in few requests: each of its pieces (cut at epoch boundaries) spans
    # consecutive slots of the epoch's block order, so at most size / block + 2 blocks, the
    # partial block splitting one run more.
    for start in range(0, len(flat), window):
        cuts = sorted({start, start + window, *range((start // num + 1) * num, start + window, num)})
        for low, high in zip(cuts, cuts[1:]):
            assert len(record_runs(served[low:high])) <= -(-(high - low) // block) + 2


def test_one_record_a_read_is_a_full_shuffle_of_each_epoch_and_slices_each_global_batch():
    """read_block 1 gives the order before block reads: index_shuffle of the epoch, global
    batch t = positions [t G, (t + 1) G), host h its slice h."""
    num, key = 37, stream.StreamKeys.of_seed(5).shuffle
    positions = np.arange(3 * num)
    epoch_keys = [stream.fold(tf.constant(key, tf.int64), e) for e in positions // num]
    want = [
        int(tf.random.experimental.index_shuffle(tf.constant(p % num, tf.int64), k, tf.constant(num - 1, tf.int64)))
        for p, k in zip(positions, epoch_keys)
    ]
    np.testing.assert_array_equal(examples_at(example_order(num, 1, 4), positions, key), want)
    got = served_positions(3, 4, 4, 5)  # (rounds = steps, hosts, local)
    np.testing.assert_array_equal(got.reshape(5, 12), np.arange(60).reshape(5, 12))


def test_blocks_are_consecutive_records_in_a_new_order_each_epoch():
    num, block = 1000, 64  # 15 full blocks and one of 40
    key = stream.StreamKeys.of_seed(0).shuffle
    order_of = tf.function(
        lambda epoch_key: tf.map_fn(
            lambda q: stream.block_index(q, num, block, epoch_key),
            tf.range(num, dtype=tf.int64),
            fn_output_signature=tf.int64,
        )
    )
    orders = []
    for epoch in range(3):
        order = order_of(stream.fold(tf.constant(key, tf.int64), epoch)).numpy()
        np.testing.assert_array_equal(np.sort(order), np.arange(num))
        # Each block's records sit consecutive and in order, wherever the block lands.
        for i in np.flatnonzero(order % block == 0):
            size = min(block, num - order[i])
            np.testing.assert_array_equal(order[i : i + size], np.arange(order[i], order[i] + size))
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])


def examples_of_steps(steps, hosts_count, global_batch, num, block, shuffle_window, key) -> np.ndarray:
    """Returns the examples (example + num * epoch) that all hosts of a run of hosts_count serve
    at the given steps, as the pre-training stream orders them."""
    read = ReadOptions(process_index=0, process_count=hosts_count, read_block=block, shuffle_window=shuffle_window)
    served = []
    for h in range(hosts_count):
        hosts = resolve_hosts(global_batch, h, hosts_count)
        window = stream.window_size(block, read, hosts)
        positions = np.concatenate([stream.step_positions(t, hosts, window).numpy() for t in steps])
        served.append(examples_at(example_order(num, block, window), positions, key) + num * (positions // num))
    return np.concatenate(served)


@pytest.mark.parametrize(
    "num,global_batch,block,shuffle_window,before,after,step",
    [
        (400, 16, 4, 32, 2, 4, 5),  # onto more hosts
        (400, 16, 4, 32, 4, 1, 7),  # onto fewer
        (400, 16, 4, 24, 1, 8, 3),  # windows of 32 (rounded up to the local batch 16), then of 24
        (200, 12, 5, 30, 3, 2, 4),  # no size divides another
        (400, 16, 4, 32, 2, 2, 5),  # the same hosts: nothing changes
    ],
)
def test_a_resume_on_another_number_of_hosts_swaps_at_most_a_round_then_epochs_are_whole(
    num, global_batch, block, shuffle_window, before, after, step
):
    """With blocks the order depends on the number of hosts P (each host shuffles windows of its
    own): a run resumed at step k on P' hosts serves the rest of the epoch in its own layout.
    The epoch it resumes in and the next one repeat exactly as many examples as they skip, at
    most one round of windows of the larger layout (P x window examples); every epoch after is
    whole. (Rounds of at most half an epoch, as on any real dataset.)"""
    key = stream.StreamKeys.of_seed(3).shuffle
    rounds = []
    for hosts_count in (before, after):
        read = ReadOptions(process_count=hosts_count, read_block=block, shuffle_window=shuffle_window)
        rounds.append(hosts_count * stream.window_size(block, read, resolve_hosts(global_batch, 0, hosts_count)))
    assert max(rounds) <= num // 2 and step * global_batch < num  # the layouts of the docstring, resumed in epoch 0
    end = -(-4 * num // global_batch)  # into the fourth epoch: the third one served whole
    served = np.concatenate(
        [
            examples_of_steps(range(step), before, global_batch, num, block, shuffle_window, key),
            examples_of_steps(range(step, end), after, global_batch, num, block, shuffle_window, key),
        ]
    )
    repeated, skipped = [], []
    for epoch in range(3):
        counts = np.bincount(served[served // num == epoch] % num, minlength=num)
        repeated.append(int(np.sum(counts[counts > 1] - 1)))
        skipped.append(int(np.sum(counts == 0)))
    assert repeated[2] == skipped[2] == 0  # whole again
    assert sum(repeated[:2]) == sum(skipped[:2]) <= max(rounds), (repeated, skipped, rounds)
    if before == after:
        assert repeated == skipped == [0, 0, 0]
    else:
        assert sum(repeated) > 0  # the layouts differ: the test sees the swap it bounds


def test_only_sources_that_read_a_run_in_one_request_read_in_blocks():
    read = ReadOptions(read_block=16)
    folder = sources.ImageSource("folder:x", 10, 0, None, None, str)
    assert stream.read_block(read, folder) == 1  # a file per image: blocks save no request
    assert stream.read_block(read, dataclasses.replace(folder, reads_runs=True)) == 16


def test_read_options_refuse_non_positive_blocks_and_windows():
    with pytest.raises(ValueError, match="read_block=0: give a positive count"):
        ReadOptions(read_block=0)
    with pytest.raises(ValueError, match="shuffle_window=-1: give a positive count"):
        ReadOptions(shuffle_window=-1)


def test_record_runs_cover_the_distinct_indices_with_maximal_runs():
    indices = [9, 3, 4, 4, 12, 10, 5, 0]
    assert record_runs(indices) == [(0, 1), (3, 6), (9, 11), (12, 13)]
    assert record_runs([]) == []
