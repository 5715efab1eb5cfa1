"""A tf.data service deployment: make pre-training batches on machines other than the trainers.

    python -m vicregl_jax.data.service dispatcher --port=5050
    python -m vicregl_jax.data.service worker --dispatcher=HOST:5050 --port=5051   # on each CPU machine
    # then: make_pretrain_iterator(..., service="grpc://HOST:5050")

Workers run the pipeline's graph (TensorFlow ops only: `folder:` datasets, whose files every
worker must reach at the same path). Each batch is made whole by one worker from (seed, step),
and the trainer puts the batches back in step order: batches, determinism and resuming by a
seek are those of the local pipeline. What the service weakens: a worker lost while making a
batch loses it (the service hands each step out once), and the iterator then stops with an
error after 64 later batches arrived (the run resumes from its last checkpoint); read errors
are not retried and count as undecodable images (a service graph cannot call Python).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    """Starts a dispatcher or a worker and serves until killed; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m vicregl_jax.data.service", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role", required=True)
    dispatcher = sub.add_parser("dispatcher", help="start the dispatcher (one per deployment)")
    dispatcher.add_argument("--port", type=int, default=5050)
    dispatcher.add_argument(
        "--work_dir", default=None, help="where the dispatcher keeps its state to survive restarts (e.g. gs://...)"
    )
    worker = sub.add_parser("worker", help="start a worker (one per CPU machine)")
    worker.add_argument("--dispatcher", required=True, help="HOST:PORT of the dispatcher")
    worker.add_argument("--port", type=int, default=0, help="0: any free port")
    worker.add_argument(
        "--worker_address", default=None, help="HOST:%%port the dispatcher gives to clients (default: this host's name)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    service = tf.data.experimental.service
    if args.role == "dispatcher":
        server = service.DispatchServer(
            service.DispatcherConfig(port=args.port, work_dir=args.work_dir, fault_tolerant_mode=bool(args.work_dir))
        )
        print(f"tf.data dispatcher serving at {server.target}", flush=True)
    else:
        address = args.dispatcher.split("://")[-1]
        config = dict(dispatcher_address=address, port=args.port)
        if args.worker_address:
            config["worker_address"] = args.worker_address
        server = service.WorkerServer(service.WorkerConfig(**config))
        print(f"tf.data worker serving for dispatcher {address}", flush=True)
    server.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
