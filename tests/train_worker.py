"""Runs the tiny pre-training config in its own process (multi-host and signal tests).

python tests/train_worker.py WORKDIR DATA_DIR --devices 4 --process_id 0 --num_processes 2 --port 12345
"""

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("workdir")
parser.add_argument("data_dir")
parser.add_argument("--devices", type=int, default=8)
parser.add_argument("--process_id", type=int, default=0)
parser.add_argument("--num_processes", type=int, default=1)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--overrides", default="{}")
parser.add_argument("--stop_after", type=int, default=None)
parser.add_argument("--fail_reads", action="store_true", help="every file read of this process times out")
parser.add_argument("--hang_after", type=int, default=None, help="the input blocks for good after this many batches")
parser.add_argument("--stop_grace", type=float, default=None, help="stopping.STOP_GRACE_S")
parser.add_argument("--exit_code", action="store_true", help="exit with the run's status, as main.py does")
args = parser.parse_args()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import xla_flags  # noqa: E402

os.environ["XLA_FLAGS"] = xla_flags(args.devices)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if args.num_processes > 1:
    jax.distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)

from tiny import tiny_config  # noqa: E402

from vicregl_jax import train  # noqa: E402

if args.fail_reads:  # faked at the boundary: the storage under this host times out on every read
    from vicregl_jax.data import sources

    def timing_out(path):
        raise TimeoutError(f"injected: reading {path} timed out")

    sources.read_file = timing_out
    sources.READ_BACKOFF_S = 0.01  # the retries themselves are tested elsewhere: give up quickly

if args.hang_after is not None:  # an input that stops answering (a FIFO, a hung mount), at the boundary
    import itertools
    import time

    from vicregl_jax import data as data_lib

    make = data_lib.prefetch_to_mesh

    class Hanging:
        def __init__(self, batches):
            self.batches, self.given = batches, itertools.count()

        def __next__(self):
            if next(self.given) >= args.hang_after:
                print("HANGING", flush=True)
                while True:
                    time.sleep(3600)
            return next(self.batches)

        def __getattr__(self, name):
            return getattr(self.batches, name)

    train.data_lib.prefetch_to_mesh = lambda *a, **k: Hanging(make(*a, **k))
if args.stop_grace is not None:
    from vicregl_jax import stopping

    stopping.STOP_GRACE_S = args.stop_grace

result = train.train_and_evaluate(
    tiny_config(args.data_dir, json.loads(args.overrides)), args.workdir, stop_after_steps=args.stop_after
)
print("RESULT", json.dumps({"step": result.step, "stopped_early": result.stopped_early}), flush=True)
if args.exit_code:
    sys.exit(result.exit_code)
