"""The deterministic stream of examples under every iterator: positions, epoch shuffles, host
slices and bad-example substitution, as one tf.data graph per iterator.

Positions. The stream is indexed by a global position p = 0, 1, 2, ...: global batch t holds
positions [t G, (t + 1) G) for a global batch size G, and host h of P takes the contiguous
slice [t G + h G/P, t G + (h + 1) G/P) (`host_positions`). In a shuffled stream, position p is
example `index_shuffle(p mod N)` of epoch p // N, a stateless permutation of the N examples
keyed by (the stream's shuffle key, epoch); every random draw of the example is keyed by (its
example key, p). So the element at position p is a pure function of (keys, p): the same for
any number of hosts or parallel calls, each example is seen once per epoch across hosts, and
starting at step k is a seek (the stream starts from position k G), not a replay.

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


def epoch_index(position: tf.Tensor, num_examples: int, shuffle_key) -> tf.Tensor:
    """Returns the example at a global position: a permutation of the dataset per epoch."""
    key = fold(tf.constant(shuffle_key, tf.int64), position // num_examples)
    return tf.random.experimental.index_shuffle(position % num_examples, key, tf.constant(num_examples - 1, tf.int64))


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


def examples(
    source: sources.ImageSource,
    steps: tf.data.Dataset,
    *,
    positions_of: Callable,
    index_of: Callable,
    attempts_of: Callable,
    process: Callable,
    example_key,
    parallel: int,
    python_reads: bool = True,
    read_calls: int = 2,
) -> tf.data.Dataset:
    """Returns the dataset of processed examples of the given steps, in order: per position of
    `positions_of(step)`, `process(*source.parse(record, label), position)` of the first of its
    example (`index_of(position)`) and substitutes that reads and processes, trying
    `attempts_of(position)` examples, with the counts of failures met on the way (FAILURE_KEYS).
    A position whose tries all fail (or that tries none) is made of the source's placeholder.
    """
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

    ds = steps.map(read_step, num_parallel_calls=read_calls, deterministic=True).unbatch()
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
    examples of each step drawn from a shuffled epoch order, processed (substituted where they
    fail), batched and finished (finish_batch on the whole batch), without the final prefetch."""
    parallel = read.threads()
    ds = examples(
        source,
        tf.data.Dataset.counter(start_step),
        positions_of=lambda step: host_positions(step, hosts),
        index_of=lambda position: epoch_index(position, source.num_examples, keys.shuffle),
        attempts_of=lambda position: MAX_ATTEMPTS,
        process=process,
        example_key=keys.example,
        parallel=parallel,
        python_reads=python_reads,
    )
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

    ds = examples(
        source,
        tf.data.Dataset.range(start_step, steps),
        positions_of=lambda step: host_positions(step, hosts),
        index_of=lambda position: tf.minimum(position, num - 1),
        attempts_of=attempts_of,
        process=process,
        example_key=(0, 0),
        parallel=parallel,
    )
    return batched(ds, hosts.local_batch, finish_batch, parallel)
