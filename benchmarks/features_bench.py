"""A released model's load time by name, and what `vicregl_jax.features` costs over the backbone.

    python benchmarks/features_bench.py                    # ResNet-50, batch 64, 224 x 224
    python benchmarks/features_bench.py --batch 8 --repeats 2

The release's ResNet-50 backbone file is written by torch from random weights (the layout of
resnet50_alpha0.9.pth) into a temporary folder and served by a local HTTP server standing
for the release's address ($VICREGL_JAX_RELEASE_URL); the cache is a fresh temporary folder.
Rows:

  first load   `vicregl_jax.load("resnet50_alpha0.9")` in a fresh process: download, sha256,
               strict load, conversion written to the cache (Orbax)
  second load  the same in another fresh process: the file's sha256 and the converted files'
               checked, the weights restored; the server's request count shows it asked nothing
  backbone     the backbone's jitted forward on normalised float32 images already on the
               device (what the features cannot beat)
  features     `vicregl_jax.features(model, uint8 images)`: transfer, normalisation, forward,
               the dense map reshaped, the cell locations; device arrays, blocked on
  extractor    the same through one `Extractor` reused across calls

Times are medians over --repeats rounds after one warm-up call, the three calls interleaved
in each round (the loads: one process each; the time of importing jax / flax / orbax in that
process is shown apart).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import common  # puts the repository root on the path
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import vicregl_jax
from references.torch_modules import TORCH_BACKBONES
from vicregl_jax import extract
from vicregl_jax import weights as weights_lib

NAME = "resnet50_alpha0.9"
LOAD = """
import json, time
start = time.perf_counter()
import vicregl_jax.weights as weights
imported = time.perf_counter()
model, config = weights.load({name!r}, progress=False)
print(json.dumps({{"import_s": imported - start, "load_s": time.perf_counter() - imported}}))
"""


REQUESTS: list[str] = []  # the paths the server was asked for


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        REQUESTS.append(self.path)


def serve(folder: str) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Returns a started local HTTP server of folder's files and its address."""
    handler = functools.partial(_CountingHandler, directory=folder)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def timed_load(env: dict) -> dict:
    """Returns the {"import_s", "load_s"} of loading NAME in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", LOAD.format(name=NAME)], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        sys.exit(f"loading {NAME} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_rows(folder: str) -> tuple[list[dict], str]:
    """Returns the table rows of the first and second loads, and the cache folder."""
    files = os.path.join(folder, "served")
    os.makedirs(files)
    torch.manual_seed(0)
    torch.save(TORCH_BACKBONES["resnet50"]().state_dict(), os.path.join(files, f"{NAME}.pth"))
    server, url = serve(files)
    cache = os.path.join(folder, "cache")
    env = {**os.environ, weights_lib.CACHE_ENV: cache, weights_lib.URL_ENV: url, "PYTHONPATH": common.ROOT}
    rows = []
    for what in ("first load", "second load"):
        before = len(REQUESTS)
        times = timed_load(env)
        rows.append(
            {
                "what": what,
                "seconds": f"{times['load_s']:.2f}",
                "note": f"{len(REQUESTS) - before} HTTP requests; import {times['import_s']:.1f} s",
            }
        )
    server.shutdown()
    os.environ.update({weights_lib.CACHE_ENV: cache, weights_lib.URL_ENV: url})
    return rows, cache


def feature_rows(batch: int, size: int, repeats: int) -> list[dict]:
    """Returns the rows of the backbone's forward, features() and a reused Extractor."""
    model, _ = vicregl_jax.load(NAME, progress=False)
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    mean, std = np.float32(extract.EVAL_MEAN), np.float32(extract.EVAL_STD)
    normalised = jax.device_put(jnp.asarray((images / np.float32(255) - mean) / std))
    extractor = extract.Extractor(model)
    calls = {
        "backbone": lambda: jax.block_until_ready(forward(state, normalised)),
        "features": lambda: jax.block_until_ready(vicregl_jax.features(model, images)),
        "extractor": lambda: jax.block_until_ready(extractor(images)),
    }
    for call in calls.values():  # compile and warm up
        call()
    times = {what: [] for what in calls}
    for _ in range(repeats):  # interleaved, so that a change of the machine's load hits every row alike
        for what, call in calls.items():
            start = time.perf_counter()
            call()
            times[what].append(time.perf_counter() - start)
    seconds = {what: statistics.median(t) for what, t in times.items()}
    return [
        {
            "what": what,
            "seconds": f"{s:.2f}",
            "note": f"{batch / s:.1f} img/s; {100 * (s / seconds['backbone'] - 1):+.1f}% over the backbone",
        }
        for what, s in seconds.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows, _ = load_rows(folder)
        rows += feature_rows(args.batch, args.size, args.repeats)
    print(
        f"ResNet-50 ({NAME} layout, random weights); features at batch {args.batch}, {args.size} x {args.size}, "
        f"{jax.devices()[0].device_kind}, {jax.device_count()} device(s)"
    )
    common.print_table(rows)


if __name__ == "__main__":
    main()
