"""Starting a run on one process or many: jax.distributed, checked against what the launcher asked for.

    launch = distributed.start("auto", coordinator_address, num_processes, process_id)

`start` must run before anything touches a JAX device. It decides whether this process is one
of several (explicit flags or JAX_* variables, a SLURM job step, a Cloud TPU pod slice), calls
`jax.distributed.initialize` with every argument spelled out, prints one line saying what it
found, and stops the run when the devices JAX sees differ from what the launcher asked for
(4 devices where SLURM allocated 4 nodes x 8 GPUs, 16 where the slice is a v4-64).

Cluster detection is JAX's own (the ClusterEnv classes of the pinned jax, the ones
`jax.distributed.initialize()` consults), so this module cannot decide differently from JAX;
it only adds what JAX leaves out:
- SLURM: JAX gives each process the single GPU `SLURM_LOCALID`, right for one task per GPU and
  wrong for one task per node (the other GPUs of the node sit idle). Here each task gets the
  GPUs of its node divided by the tasks on the node: all of them with one task per node (what
  launch/slurm.sbatch starts), one with one task per GPU.
- Cloud TPU: a pod slice with more than one host always initialises, whatever starts it.

Also here: the exit status that asks a launcher to restart the run (REQUEUE_EXIT_CODE) and the
persistent compilation cache. What the processes say to each other once started (the key-value
store, failure reports, process 0 first) is `coordination.py`, below this module.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re

import jax
from jax._src import clusters as jax_clusters
from jax._src.clusters import cloud_tpu_cluster

from vicregl_jax import workdir as workdir_lib

MODES = ("auto", "on", "off")

# The exit status of a run that saved a checkpoint because it was told to stop (SIGTERM from a
# preemption notice or a scheduler's time limit) and should be started again with the same
# command: EX_TEMPFAIL of sysexits.h ("temporary failure, try again"). launch/slurm.sbatch
# turns it into `scontrol requeue`, launch/tpu_pod.sh's supervise loop into a restart.
REQUEUE_EXIT_CODE = 75

COMPILATION_CACHE_SUBDIR = "compilation_cache"

_NVIDIA_DEVICE_FILE = re.compile(r"^nvidia\d+$")
_TPU_ACCELERATOR = re.compile(r"^(v\d+[a-z]*|v5litepod)-(\d+)$")
# JAX devices per unit of the accelerator-type suffix: v2/v3 name TensorCores, one device
# each; v4/v5p name TensorCores, two per chip joined into one device (megacore); v5e (v5litepod)
# and v6e name chips, one TensorCore each.
_TPU_DEVICES_PER_UNIT = {
    "v2": (1, 1),
    "v3": (1, 1),
    "v4": (1, 2),
    "v5p": (1, 2),
    "v5litepod": (1, 1),
    "v5e": (1, 1),
    "v6e": (1, 1),
}


class LaunchError(RuntimeError):
    """The processes or devices of this run are not what the launcher set up."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process takes part in the run, decided before JAX starts its backends.

    initialize: whether jax.distributed.initialize is called (with the four arguments below).
    source: what decided: "flags", "environment" (JAX_* variables), a JAX cluster name
      ("slurm", "gcetpu", "gketpu", "ompi", ...), or "single" (one process alone).
    expected_devices / expected_from: the global device count the launcher asked for and
      where that number comes from ("SLURM: 4 nodes x 8 GPUs"); None when nothing says.
    """

    initialize: bool
    source: str
    coordinator_address: str | None
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None
    expected_devices: int | None = None
    expected_from: str = ""


# ------------------------------------------------------------------------------------------
# The decision
# ------------------------------------------------------------------------------------------


def detected_cluster():
    """Returns the JAX cluster environment class that jax.distributed.initialize() would use
    here (SlurmCluster, GceTpuCluster, ...), or None."""
    for cluster in jax_clusters.ClusterEnv._cluster_types:
        if cluster.opt_in_only_method:  # mpi4py: used only when asked for by name
            continue
        if cluster.is_env_present():
            return cluster
    return None


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer: set it to this process's number.") from None


def _expand_slurm_counts(text: str) -> list[int]:
    """Returns the per-node counts of a SLURM list such as '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            return []
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def _trailing_int(text: str | None) -> int | None:
    """Returns the count of a SLURM GPU request such as '8', 'a100:8' or 'gpu:a100:8'."""
    if not text:
        return None
    match = re.search(r"(\d+)\s*$", text.split(",")[0])
    return int(match.group(1)) if match else None


def visible_gpu_count() -> int:
    """Returns the number of NVIDIA GPUs this process may use: CUDA_VISIBLE_DEVICES when set
    (SLURM sets it to the GPUs it allocated), else the /dev/nvidiaN device files."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return sum(1 for name in os.listdir("/dev") if _NVIDIA_DEVICE_FILE.match(name))
    except OSError:
        return 0


def slurm_local_device_ids() -> tuple[int, ...] | None:
    """Returns the GPU ordinals this SLURM task drives: its share of the GPUs it sees, the
    share being the visible GPUs divided by the tasks on its node (all of them for one task
    per node, one for one task per GPU). None when no GPU is visible (CPU or TPU jobs)."""
    gpus = visible_gpu_count()
    if gpus == 0:
        return None
    local_id = _int_env("SLURM_LOCALID") or 0
    node = _int_env("SLURM_NODEID") or 0
    per_node = _expand_slurm_counts(
        os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE") or ""
    )
    if node < len(per_node):
        tasks_here = per_node[node]
    else:
        ntasks, nnodes = (
            _int_env("SLURM_NTASKS") or 1,
            _int_env("SLURM_STEP_NUM_NODES") or _int_env("SLURM_NNODES") or 1,
        )
        tasks_here = max(1, ntasks // nnodes)
    if tasks_here == 1:
        return tuple(range(gpus))
    if gpus == 1:  # the task was bound to one GPU (--gpus-per-task=1 / --gpu-bind)
        return (0,)
    if gpus % tasks_here:
        raise LaunchError(
            f"SLURM started {tasks_here} tasks on this node, which sees {gpus} GPUs: they cannot be "
            f"shared out evenly. Use --ntasks-per-node=1 (one process drives every GPU of its node, "
            f"as launch/slurm.sbatch does) or --ntasks-per-node={gpus} (one process per GPU)."
        )
    share = gpus // tasks_here
    return tuple(range(local_id * share, (local_id + 1) * share))


def slurm_expected_devices() -> tuple[int | None, str]:
    """Returns (GPUs the SLURM job asked for: nodes x GPUs per node, a description), or
    (None, "") when it asked for no GPUs or this is not a SLURM job."""
    if "SLURM_JOB_ID" not in os.environ:
        return None, ""
    nodes = _int_env("SLURM_STEP_NUM_NODES") or _int_env("SLURM_JOB_NUM_NODES") or _int_env("SLURM_NNODES")
    per_node = _trailing_int(os.environ.get("SLURM_GPUS_PER_NODE")) or _trailing_int(
        os.environ.get("SLURM_GPUS_ON_NODE")
    )
    if not nodes or not per_node:
        return None, ""
    return nodes * per_node, f"SLURM: {nodes} node{'s' if nodes > 1 else ''} x {per_node} GPUs"


def tpu_device_count(accelerator_type: str) -> int | None:
    """Returns the JAX devices of one slice of a Cloud TPU accelerator type ('v4-64' -> 32,
    'v5p-128' -> 64, 'v5litepod-16' -> 16, 'v6e-256' -> 256), or None for a type not known here."""
    match = _TPU_ACCELERATOR.match(accelerator_type.strip().lower())
    if not match or match.group(1) not in _TPU_DEVICES_PER_UNIT:
        return None
    numerator, denominator = _TPU_DEVICES_PER_UNIT[match.group(1)]
    return int(match.group(2)) * numerator // denominator


def tpu_expected_devices(cluster) -> tuple[int | None, str]:
    """Returns (devices the TPU slice(s) have, a description) from the VM's accelerator type."""
    accelerator = None
    if cluster is cloud_tpu_cluster.GceTpuCluster:
        text, code = cloud_tpu_cluster.get_metadata("accelerator-type")
        accelerator = text.strip() if code == 200 else None
    accelerator = accelerator or os.environ.get("TPU_ACCELERATOR_TYPE")
    if not accelerator:
        return None, ""
    per_slice = tpu_device_count(accelerator)
    if per_slice is None:
        logging.warning("Unknown TPU accelerator type %r: the device count is not checked.", accelerator)
        return None, ""
    slices = cloud_tpu_cluster.BaseTpuCluster._get_num_slices()
    if slices > 1:
        return per_slice * slices, f"TPU: {slices} slices of {accelerator}"
    return per_slice, f"TPU: {accelerator}"


def _check_processes(
    mode: str, source: str, coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """Raises LaunchError when the process count or id is missing or out of range, or mode "off" has several."""
    if num_processes is None or process_id is None:
        missing = "--num_processes" if num_processes is None else "--process_id"
        raise LaunchError(
            f"--coordinator_address={coordinator_address} but {missing} is not given: pass both "
            "--num_processes=N and --process_id=I (or JAX_NUM_PROCESSES, JAX_PROCESS_ID)."
        )
    if not 0 <= process_id < num_processes:
        raise LaunchError(f"--process_id={process_id} is outside [0, --num_processes={num_processes}).")
    if mode == "off" and num_processes > 1:
        raise LaunchError(
            f"--distributed=off but this is process {process_id} of {num_processes} ({source}): each "
            "would train alone into the same workdir (and a TPU pod slice cannot run one host alone). "
            "Use --distributed=auto, or start a single process."
        )


def plan_launch(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> Launch:
    """Returns how this process should start (see Launch), from the mode, the flags, the
    JAX_* environment variables and JAX's cluster detection; touches no device.

    mode "auto": initialise when this process is one of several. "on": always initialise
    (a coordinator must be known). "off": never; refused when the launcher started several
    processes (they would each train alone into the same workdir, or hang on a TPU pod).
    """
    if mode not in MODES:
        raise LaunchError(f"--distributed={mode!r}: use one of {', '.join(MODES)}.")
    source = "flags"
    if coordinator_address is None and os.environ.get("JAX_COORDINATOR_ADDRESS"):
        coordinator_address, source = os.environ["JAX_COORDINATOR_ADDRESS"], "environment"
    if num_processes is None:
        num_processes = _int_env("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _int_env("JAX_PROCESS_ID")
    env_ids = os.environ.get("JAX_LOCAL_DEVICE_IDS")
    local_device_ids = tuple(int(i) for i in env_ids.split(",")) if env_ids else None

    cluster = detected_cluster()
    expected, expected_from = None, ""
    if cluster is not None:
        if cluster.name == "slurm":
            expected, expected_from = slurm_expected_devices()
            if local_device_ids is None:
                local_device_ids = slurm_local_device_ids()
        elif cluster.name in ("gcetpu", "gketpu"):
            expected, expected_from = tpu_expected_devices(cluster)
        if num_processes is None:
            num_processes = cluster.get_process_count()
        if process_id is None:
            process_id = cluster.get_process_id()
        if coordinator_address is None:
            source = cluster.name
            if cluster.name in ("slurm", "ompi"):  # from the environment alone; on TPU, JAX
                # finds it itself, waiting for the coordinator's DNS name to resolve
                coordinator_address = cluster.get_coordinator_address(
                    timeout_secs=None, override_coordinator_port=os.environ.get("JAX_COORDINATOR_PORT")
                )
    elif "SLURM_JOB_ID" in os.environ:
        # A SLURM job outside a job step (python run straight from the batch script): one
        # process, which the device check compares with the job's allocation.
        expected, expected_from = slurm_expected_devices()

    if coordinator_address is None and cluster is None:
        if (num_processes or 1) > 1:
            raise LaunchError(
                f"--num_processes={num_processes} but no coordinator: give --coordinator_address=HOST:PORT "
                "(process 0's address and a free port) too, or JAX_COORDINATOR_ADDRESS."
            )
        if mode == "on":
            raise LaunchError(
                "--distributed=on but nothing names a coordinator: pass --coordinator_address=HOST:PORT "
                "--num_processes=N --process_id=I (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                "JAX_PROCESS_ID), or start the processes with srun or on a Cloud TPU pod slice."
            )
        return Launch(False, "single", None, 1, 0, local_device_ids, expected, expected_from)

    _check_processes(mode, source, coordinator_address, num_processes, process_id)
    initialize = mode == "on" or num_processes > 1  # mode "off" has one process here
    if not initialize:
        return Launch(False, "single", None, 1, 0, local_device_ids, expected, expected_from)
    return Launch(
        True, source, coordinator_address, num_processes, process_id, local_device_ids, expected, expected_from
    )


# ------------------------------------------------------------------------------------------
# Starting and checking
# ------------------------------------------------------------------------------------------


def check_device_count(launch: Launch, global_devices: int, local_devices: int, process_count: int) -> None:
    """Raises LaunchError with the numbers when the run's processes or devices differ from
    what the launcher set up; returns None when they agree."""
    if launch.initialize and process_count != launch.num_processes:
        raise LaunchError(
            f"JAX reports {process_count} processes but the launcher ({launch.source}) started "
            f"{launch.num_processes}: check that every process was started with the same coordinator."
        )
    if launch.local_device_ids is not None and local_devices != len(launch.local_device_ids):
        raise LaunchError(
            f"this process sees {local_devices} local devices but was given GPUs "
            f"{list(launch.local_device_ids)}: check CUDA_VISIBLE_DEVICES and that jax[cuda] is installed."
        )
    if launch.expected_devices is not None and global_devices != launch.expected_devices:
        hint = ""
        if launch.expected_from.startswith("SLURM"):
            hint = (
                " Start one task per node (srun --ntasks-per-node=1, every GPU visible to it) or one "
                "task per GPU, and run python under srun, as launch/slurm.sbatch does."
            )
        elif launch.expected_from.startswith("TPU"):
            hint = " Start main.py on every worker of the slice (launch/tpu_pod.sh run)."
        raise LaunchError(
            f"this run sees {global_devices} devices ({process_count} process{'es' if process_count > 1 else ''} "
            f"x {local_devices} local) but {launch.expected_from} = {launch.expected_devices}: it would train "
            f"on {global_devices} of the {launch.expected_devices} devices it holds.{hint}"
        )


def describe(launch: Launch) -> str:
    """Returns one line saying how this process runs: process, devices, source."""
    ids = "" if launch.local_device_ids is None else f", GPUs {list(launch.local_device_ids)}"
    expected = f"; launcher: {launch.expected_from}" if launch.expected_from else ""
    return (
        f"process {jax.process_index()} of {jax.process_count()} ({launch.source}): "
        f"{jax.local_device_count()} local / {jax.device_count()} global {jax.default_backend()} "
        f"devices{ids}{expected}"
    )


def start(*args, **kwargs) -> Launch:
    """Initialises jax.distributed when this run spans several processes (plan_launch's
    arguments, the same meaning), prints what it found, checks the device count, and returns
    the Launch."""
    launch = plan_launch(*args, **kwargs)
    if launch.initialize and not jax.distributed.is_initialized():
        jax.distributed.initialize(
            coordinator_address=launch.coordinator_address,
            num_processes=launch.num_processes,
            process_id=launch.process_id,
            local_device_ids=list(launch.local_device_ids) if launch.local_device_ids is not None else None,
        )
    elif not launch.initialize and launch.local_device_ids is not None:
        # One process: restrict the GPUs it uses as jax.distributed would.
        jax.config.update("jax_cuda_visible_devices", ",".join(map(str, launch.local_device_ids)))
    print(f"vicregl_jax: {describe(launch)}", flush=True)
    check_device_count(launch, jax.device_count(), jax.local_device_count(), jax.process_count())
    return launch


# ------------------------------------------------------------------------------------------
# Persistent compilation cache
# ------------------------------------------------------------------------------------------


def default_compilation_cache_dir(workdir: str | None) -> str:
    """Returns workdir/compilation_cache (kept with the run, so a restarted or recreated
    machine finds it), or $XDG_CACHE_HOME/vicregl_jax/compilation_cache without a workdir."""
    if workdir:
        return f"{str(workdir_lib.absolute(str(workdir).rstrip('/')))}/{COMPILATION_CACHE_SUBDIR}"
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "vicregl_jax", COMPILATION_CACHE_SUBDIR)


def enable_compilation_cache(cache_dir: str | None = None, workdir: str | None = None) -> str | None:
    """Points JAX's persistent compilation cache at cache_dir (local or gs://) and returns it.

    cache_dir None: $JAX_COMPILATION_CACHE_DIR when set, else default_compilation_cache_dir;
    "off": no cache (returns None). Call before the first jit: JAX opens the cache once.
    """
    if cache_dir == "off":
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if cache_dir is None:
        cache_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_compilation_cache_dir(workdir)
    else:
        cache_dir = str(workdir_lib.absolute(cache_dir))
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    return cache_dir
