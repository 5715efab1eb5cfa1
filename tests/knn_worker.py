"""Runs the sharded kNN of vicregl_jax.evaluate.knn on synthetic features in its own process
(the multi-process kNN test), printing the hits and the peak of host (numpy / Python)
allocations while it runs.

    python tests/knn_worker.py --devices 4 --process_id 0 --num_processes 2 --port 12345
"""

import argparse
import json
import os
import sys
import tracemalloc

parser = argparse.ArgumentParser()
parser.add_argument("--devices", type=int, default=8)
parser.add_argument("--process_id", type=int, default=0)
parser.add_argument("--num_processes", type=int, default=1)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--train", type=int, default=2048)
parser.add_argument("--dim", type=int, default=4096)
args = parser.parse_args()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import xla_flags  # noqa: E402

os.environ["XLA_FLAGS"] = xla_flags(args.devices)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if args.num_processes > 1:
    jax.distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)

from vicregl_jax import sharding  # noqa: E402
from vicregl_jax.evaluate import knn  # noqa: E402

CLASSES, BATCH = 10, 256
mesh = sharding.make_mesh()
centres = jax.random.normal(jax.random.key(0), (CLASSES, args.dim))


def feature_fn(indices):
    """Features made on the device from example indices: class centre + noise (never on a host)."""
    labels = indices % CLASSES
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(jax.random.key(1), i), (args.dim,)))(indices)
    return None, 0.08 * centres[labels] + noise  # classes that overlap: some votes go wrong


def batches(count, offset):
    """This host's slice of each global batch: {"image": example indices, "label", "mask"}."""
    local = BATCH // jax.process_count()
    for start in range(0, count, BATCH):
        index = start + jax.process_index() * local + np.arange(local)
        yield {
            "image": (index + offset).astype(np.int32),
            "label": (index % CLASSES).astype(np.int32),
            "mask": index < count,
        }


tracemalloc.start()
train = knn.sharded_features(feature_fn, batches(args.train, 0), mesh)
test = knn.sharded_features(feature_fn, batches(512, 10**6), mesh)
hits = knn.make_sharded_hits(mesh, k=20, temperature=0.07, num_classes=CLASSES)
total = [0, 0]
for t in range(test.features.shape[0]):
    h1, h5 = hits(train.features, train.labels, test.features[t], test.labels[t])
    total = [total[0] + int(h1), total[1] + int(h5)]
_, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
print(
    "RESULT",
    json.dumps(
        {"hits": total, "count": test.count, "host_peak_bytes": peak, "train_feature_bytes": args.train * args.dim * 4}
    ),
    flush=True,
)
