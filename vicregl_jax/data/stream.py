"""The deterministic stream of examples under every iterator: positions, epoch shuffles, host
slices and bad-example substitution, as one tf.data graph per iterator.

Positions. The stream is indexed by a global position p = 0, 1, 2, ...; epoch e is positions
[e N, (e + 1) N) of a dataset of N examples, and each epoch's positions hold a permutation of
the examples, keyed by (the stream's shuffle key, e); every random draw of an example is keyed
by (its example key, p). So the element at position p is a pure function of (keys, p), each
example is seen once per epoch across hosts, and starting at step k is a seek, not a replay.

Order and reads (ReadOptions.read_block B, shuffle_window). One request per record is more than
a bucket affords on a pod, so where a source reads a run of records with one request
(ArrayRecord; `read_block`), an epoch is made of blocks: the N examples are cut into blocks of
B consecutive records (the last one partial when B does not divide N), and the blocks are
permuted per epoch, the partial one at a random slot (`block_index`). Each host owns whole
windows of W positions (shuffle_window rounded up to a multiple of the local batch L): in its
round r (steps r W/L .. (r + 1) W/L - 1) host h of P serves window r P + h, whose W examples it
reads at once, one request per run of consecutive records, in an order shuffled within the
window (cut at epoch boundaries, so that no window mixes two epochs: `window_position`). A start
at step k reads the window of step k and skips the steps before k in it. With B = 1, and for
sources that read a file per image (folders: blocks would save no request), the window is the
local batch and nothing is shuffled within it: global batch t is positions [t G, (t + 1) G),
host h takes the slice [t G + h L, t G + (h + 1) L), and each epoch is one permutation of the
whole dataset, read one request per example (the order before block reads).

Substitution. An example that cannot be read or processed is replaced by a random other
example (up to MAX_ATTEMPTS tries per position, drawn from (example key, p): batches stay
fixed), and every batch carries the counts of the failures met on the way (FAILURE_KEYS), which
`iterator.BatchIterator` accounts for. A pass over a dataset (evaluation) tries one example per
position and never substitutes: the factory masks what failed.

Each task supplies only `process(*parsed record, position) -> dict` (one example) and
`finish_batch(batch) -> batch` (the whole batch); the reading, ordering and failure handling
are the same for all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import tensorflow as tf

from vicregl_jax.data import sources
from vicregl_jax.data.options import Hosts, ReadOptions

MAX_ATTEMPTS = 8  # tries per position: its example, then random substitutes
FAILURE_KEYS = ("read_failures", "decode_failures", "failed_index", "failed_read")

# Salts that separate the random streams derived from one seed.
SHUFFLE_SALT, EXAMPLE_SALT = 0x5EED, 0x71E35
_SUBSTITUTE = 4
_PARTIAL_SLOT, _WINDOW = 5, 6


@dataclasses.dataclass(frozen=True)
class StreamKeys:
    """The root keys (int64 pairs) of a stream: `shuffle` keys the epoch permutations,
    `example` the draws of each position (its augmentation, its substitutes)."""

    shuffle: tuple[int, int]
    example: tuple[int, int]

    @classmethod
    def of_seed(cls, seed: int) -> StreamKeys:
        """Returns the keys of the pre-training and linear-training streams of `seed`."""
        return cls((seed, SHUFFLE_SALT), (seed, EXAMPLE_SALT))


def fold(key: tf.Tensor, data) -> tf.Tensor:
    """Returns the stateless key (2,) derived from `key` and `data` (a salt, a position, ...)."""
    return tf.random.experimental.stateless_fold_in(key, data)


def block_index(offset: tf.Tensor, num_examples: int, block: int, epoch_key: tf.Tensor) -> tf.Tensor:
    """Returns the example at `offset` in [0, num_examples) of an epoch made of blocks of `block`
    consecutive examples, the full blocks permuted by `epoch_key` and the partial last block (when
    `block` does not divide the dataset) at a random slot among them."""
    full, rest = num_examples // block, num_examples % block
    if full == 0:
        return offset
    if rest:
        partial_slot = tf.random.stateless_uniform([], fold(epoch_key, _PARTIAL_SLOT), maxval=full + 1, dtype=tf.int64)
    else:
        partial_slot = tf.constant(full, tf.int64)
    start = partial_slot * block
    in_partial = (offset >= start) & (offset < start + rest)
    in_full = tf.where(offset >= start + rest, offset - rest, offset)
    slot = tf.minimum(in_full // block, full - 1)
    chosen = tf.random.experimental.index_shuffle(slot, epoch_key, tf.constant(full - 1, tf.int64))
    return tf.where(in_partial, full * block + offset - start, chosen * block + in_full % block)


def window_position(position: tf.Tensor, num_examples: int, window: int, shuffle_key) -> tf.Tensor:
    """Returns the position whose example `position` serves: a permutation within each aligned
    window of `window` positions, cut at epoch boundaries (so that each epoch keeps its examples)."""
    start, epoch_start = position - position % window, position - position % num_examples
    low = tf.maximum(start, epoch_start)
    high = tf.minimum(start + window, epoch_start + num_examples)
    key = fold(fold(tf.convert_to_tensor(shuffle_key, tf.int64), _WINDOW), low)
    return low + tf.random.experimental.index_shuffle(position - low, key, high - low - 1)


def block_epoch_index(position: tf.Tensor, num_examples: int, block: int, window: int, shuffle_key) -> tf.Tensor:
    """Returns the example at a global position in block order: `window_position` within its
    window, then `block_index` of its epoch (with block 1: a permutation of the whole dataset per epoch)."""
    served = window_position(position, num_examples, window, shuffle_key) if block > 1 else position
    key = fold(tf.convert_to_tensor(shuffle_key, tf.int64), served // num_examples)
    return block_index(served % num_examples, num_examples, block, key)


def read_block(read: ReadOptions, source: sources.ImageSource) -> int:
    """Returns the records per read of a training stream: read.read_block where the source reads a
    run of records with one request (ArrayRecord), else 1 (an image per file: blocks would save
    no request and only correlate the order)."""
    return read.read_block if source.reads_runs else 1


def window_size(block: int, read: ReadOptions, hosts: Hosts) -> int:
    """Returns the positions of one host's window: shuffle_window rounded up to a multiple of the
    local batch (the local batch itself with blocks of 1: the order of one request per example)."""
    local = hosts.local_batch
    return local if block == 1 else -(-read.shuffle_window // local) * local


def window_host_positions(round_: tf.Tensor, hosts: Hosts, window: int) -> tf.Tensor:
    """Returns the int64 (window,) global positions that one host serves in a round, in order:
    window round * count + index, whose steps are round * window / local_batch onwards."""
    first = (round_ * hosts.count + hosts.index) * window
    return first + tf.range(window, dtype=tf.int64)


def step_positions(step: int, hosts: Hosts, window: int) -> tf.Tensor:
    """Returns the int64 (local_batch,) global positions that one host serves at `step`."""
    local, steps_per_window = hosts.local_batch, window // hosts.local_batch
    first = (step % steps_per_window) * local
    return window_host_positions(tf.constant(step // steps_per_window, tf.int64), hosts, window)[first : first + local]


def position_key(position: tf.Tensor, example_key) -> tf.Tensor:
    """Returns the stateless key (2,) of all random draws for the example at `position`."""
    return fold(tf.constant(example_key, tf.int64), position)


def host_positions(step: tf.Tensor, hosts: Hosts) -> tf.Tensor:
    """Returns the int64 (local_batch,) global positions that one host reads at `step`."""
    local = hosts.local_batch
    return step * hosts.global_batch + hosts.index * local + tf.range(local, dtype=tf.int64)


def substitute(position: tf.Tensor, example_key, attempt, num_examples: int) -> tf.Tensor:
    """Returns the example tried at `attempt` >= 1 for a position: random, so that bad files
    that sit together in the dataset's order cannot exhaust the tries of one position."""
    key = fold(fold(position_key(position, example_key), _SUBSTITUTE), attempt)
    return tf.random.stateless_uniform([], key, maxval=num_examples, dtype=tf.int64)


def _reader(source: sources.ImageSource, python_reads: bool):
    """Returns (read_step(indices), read_one(index)) of a source: by one Python call per step,
    or by TensorFlow ops per example (all a tf.data service worker can run: a read error then
    counts as undecodable)."""

    def read_step(indices):
        if python_reads:
            return source.read_tf(indices)
        count = tf.shape(indices)[0]
        return tf.fill([count], ""), tf.fill([count], tf.constant(-1, tf.int64)), tf.ones([count], tf.bool)

    def read_one(index):
        if python_reads:
            records, labels, ok = source.read_tf(index[None])
            return records[0], labels[0], ok[0]
        record, label = source.tf_read(index)
        return record, tf.cast(label, tf.int64), tf.constant(True)

    return read_step, read_one


@dataclasses.dataclass(frozen=True)
class StreamOrder:
    """What a stream reads, as TensorFlow functions: positions_of(step) the positions of a step
    (or window), index_of(position) the example at a position, attempts_of(position) how many
    examples a position may try (its own, then substitutes)."""

    positions_of: Callable
    index_of: Callable
    attempts_of: Callable


def examples(
    source: sources.ImageSource,
    steps: tf.data.Dataset,
    order: StreamOrder,
    process: Callable,
    example_key,
    *,
    parallel: int,
    python_reads: bool = True,
    read_calls: int = 2,
    skip: int = 0,
) -> tf.data.Dataset:
    """Returns the dataset of processed examples of the given steps (or windows), in order, less
    the first `skip`: per position of `order.positions_of(step)`, `process(*source.parse(record,
    label), position)` of the first of its example (`order.index_of(position)`) and substitutes
    that reads and processes, trying `order.attempts_of(position)` examples, with the counts of
    failures met on the way (FAILURE_KEYS). A position whose tries all fail (or that tries
    none) is made of the source's placeholder.
    """
    positions_of, index_of, attempts_of = order.positions_of, order.index_of, order.attempts_of
    num = source.num_examples
    read_step_records, read_one = _reader(source, python_reads)

    def read_step(step):
        positions = positions_of(step)
        indices = tf.map_fn(index_of, positions, fn_output_signature=tf.int64)
        return (positions, indices, *read_step_records(indices))

    def example(position, index0, record0, label0, ok0):
        attempts = attempts_of(position)

        def attempt(a):
            index = tf.where(a == 0, index0, substitute(position, example_key, a, num))
            if python_reads:
                record, label, ok = tf.cond(a == 0, lambda: (record0, label0, ok0), lambda: read_one(index))
            else:
                record, label, ok = read_one(index)
            return a, record, label, ok

        def count_read_failures(before, element):
            a, record, label, ok = element
            return before + tf.cast(~ok, tf.int32), (a, record, label, ok, before)

        def decode(a, record, label, ok, read_failures):
            out = process(*source.parse(record, label), position)
            a = tf.cast(a, tf.int32)
            out.update(
                read_failures=read_failures,
                decode_failures=a - read_failures,
                failed_index=tf.where(a > 0, index0, -1),
                failed_read=(a > 0) & ~ok0,
            )
            return out

        def placeholder(_):
            out = process(*(tf.constant(part) for part in source.placeholder), position)
            out.update(
                read_failures=tf.constant(0),
                decode_failures=tf.cast(attempts, tf.int32),
                failed_index=tf.where(attempts > 0, index0, -1),
                failed_read=~ok0,
            )
            return out

        tried = tf.data.Dataset.range(tf.cast(attempts, tf.int64)).map(attempt)
        tried = tried.scan(tf.constant(0), count_read_failures).filter(lambda a, r, lab, ok, n: ok)
        tried = tried.map(decode).ignore_errors()
        return tried.concatenate(tf.data.Dataset.range(1).map(placeholder)).take(1)

    ds = steps.map(read_step, num_parallel_calls=read_calls, deterministic=True).unbatch().skip(skip)
    return ds.interleave(
        example, cycle_length=parallel, block_length=1, num_parallel_calls=parallel, deterministic=True
    )


def tf_options(num_threads: int) -> tf.data.Options:
    """Returns deterministic tf.data options on `num_threads` threads."""
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = num_threads
    options.threading.max_intra_op_parallelism = 1
    return options


def batched(ds: tf.data.Dataset, local_batch: int, finish_batch: Callable, parallel: int) -> tf.data.Dataset:
    """Returns the examples in batches of local_batch, each finished by finish_batch, on
    `parallel` deterministic threads."""
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.map(finish_batch, num_parallel_calls=2, deterministic=True)
    return ds.with_options(tf_options(parallel))


def shuffled_batches(
    source: sources.ImageSource,
    start_step: int,
    keys: StreamKeys,
    process: Callable,
    finish_batch: Callable,
    *,
    hosts: Hosts,
    read: ReadOptions,
    python_reads: bool = True,
) -> tf.data.Dataset:
    """Returns this host's endless batches of steps start_step, start_step + 1, ...: the
    examples of each step drawn from a shuffled epoch order in blocks of read.read_block (read
    a window at a time: see the module docstring), processed (substituted where they fail),
    batched and finished (finish_batch on the whole batch), without the final prefetch."""
    block = read_block(read, source)
    parallel, window = read.threads(), window_size(block, read, hosts)
    steps_per_window = window // hosts.local_batch
    order = StreamOrder(
        positions_of=lambda round_: window_host_positions(round_, hosts, window),
        index_of=lambda position: block_epoch_index(position, source.num_examples, block, window, keys.shuffle),
        attempts_of=lambda position: MAX_ATTEMPTS,
    )
    rounds = tf.data.Dataset.counter(start_step // steps_per_window)
    skip = start_step % steps_per_window * hosts.local_batch  # the examples of earlier steps in the window
    ds = examples(source, rounds, order, process, keys.example, parallel=parallel, python_reads=python_reads, skip=skip)
    return batched(ds, hosts.local_batch, finish_batch, parallel)


def pass_batches(
    source: sources.ImageSource,
    start_step: int,
    steps: int,
    process: Callable,
    finish_batch: Callable,
    *,
    hosts: Hosts,
    read: ReadOptions,
    read_padding: bool = False,
) -> tf.data.Dataset:
    """Returns this host's batches of steps start_step .. steps - 1 of one pass over the dataset
    in its order, without the final prefetch. Positions past the end (the last batch's padding)
    read the last example with read_padding, else try none (the placeholder); a failed example
    is not substituted: finish_batch masks it."""
    num, parallel = source.num_examples, read.threads()

    def attempts_of(position):
        return 1 if read_padding else tf.where(position < num, 1, 0)

    def last_if_past(position):  # the padding of the last batch
        return tf.minimum(position, num - 1)

    order = StreamOrder(lambda step: host_positions(step, hosts), last_if_past, attempts_of)
    ds = examples(source, tf.data.Dataset.range(start_step, steps), order, process, (0, 0), parallel=parallel)
    return batched(ds, hosts.local_batch, finish_batch, parallel)
