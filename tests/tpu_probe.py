"""What a fake TPU VM's python runs instead of main.py in the slice-detection test (started by
tpu_worker.sh as `python main.py --config=... --workdir=W ...`): vicregl_jax.distributed's plan
from JAX's cluster detection, then `jax.distributed.initialize()` with no arguments, the device
check, and one collective over every process; the findings go to W/probe-<process>.json."""

import json
import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from vicregl_jax import distributed

workdir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))
launch = distributed.plan_launch()
cluster = distributed.detected_cluster()
jax.distributed.initialize()  # JAX's own detection decides everything
distributed.check_device_count(launch, jax.device_count(), jax.local_device_count(), jax.process_count())
gathered = multihost_utils.process_allgather(np.array([jax.process_index(), jax.local_device_count()]))
os.makedirs(workdir, exist_ok=True)
with open(os.path.join(workdir, f"probe-{jax.process_index()}.json"), "w") as f:
    json.dump(
        {
            "cluster": cluster.__name__ if cluster else None,
            "launch": {k: getattr(launch, k) for k in ("initialize", "source", "num_processes", "process_id")},
            "expected": [launch.expected_devices, launch.expected_from],
            "describe": distributed.describe(launch),
            "gathered": np.asarray(gathered).tolist(),
        },
        f,
    )
print(distributed.describe(launch), flush=True)
