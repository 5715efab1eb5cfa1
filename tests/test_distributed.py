"""Distributed start: the decision in faked SLURM / Cloud TPU / plain environments, the device
check, a real two-process start under a SLURM-like environment, the compilation cache."""

import http.server
import os
import subprocess
import sys
import textwrap
import threading

import jax
import pytest
from helpers import free_port, xla_flags
from jax._src.clusters import cloud_tpu_cluster

from vicregl_jax import distributed
from vicregl_jax.distributed import Launch, LaunchError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLEARED_PREFIXES = ("SLURM_", "SRUN_", "TPU_", "MEGASCALE_", "OMPI_")
CLEARED = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "JAX_LOCAL_DEVICE_IDS",
    "JAX_COORDINATOR_PORT",
    "CUDA_VISIBLE_DEVICES",
    "KUBERNETES_SERVICE_HOST",
    "GCE_METADATA_IP",
)


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch):
    """No launcher variables: what a laptop has (TPU_SKIP_MDS_QUERY, set by JAX on machines
    without TPU chips, is cleared too: the TPU tests fake a TPU VM)."""
    for name in list(os.environ):
        if name.startswith(CLEARED_PREFIXES) or name in CLEARED:
            monkeypatch.delenv(name)
    monkeypatch.setattr(distributed, "visible_gpu_count", _counting_cuda_visible_devices)


def _counting_cuda_visible_devices():
    # The machine's /dev/nvidia* files must not leak into the faked environments.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return 0 if visible is None else len([d for d in visible.split(",") if d])


def set_env(monkeypatch, **values):
    for name, value in values.items():
        monkeypatch.setenv(name, str(value))


def slurm_env(monkeypatch, *, nodes, tasks_per_node, procid, gpus_visible, gpus_per_node=8, job=4242):
    """The variables srun gives a task of a job step (sbatch --nodes=N --ntasks-per-node=T
    --gpus-per-node=G), with CUDA_VISIBLE_DEVICES as SLURM sets it for the task."""
    set_env(
        monkeypatch,
        SLURM_JOB_ID=job,
        SLURM_STEP_NODELIST=f"gpu[001-{nodes:03d}]",
        SLURM_NTASKS=nodes * tasks_per_node,
        SLURM_PROCID=procid,
        SLURM_LOCALID=procid % tasks_per_node,
        SLURM_NODEID=procid // tasks_per_node,
        SLURM_STEP_NUM_NODES=nodes,
        SLURM_JOB_NUM_NODES=nodes,
        SLURM_STEP_TASKS_PER_NODE=f"{tasks_per_node}(x{nodes})",
        SLURM_GPUS_PER_NODE=f"h100:{gpus_per_node}",
        CUDA_VISIBLE_DEVICES=",".join(map(str, gpus_visible)),
    )


# ------------------------------------------------------------------------------------------
# Plain, flags and environment variables
# ------------------------------------------------------------------------------------------


def test_a_plain_machine_runs_one_process_without_jax_distributed():
    launch = distributed.plan_launch("auto")
    assert launch == Launch(False, "single", None, 1, 0, None, None, "")
    assert distributed.plan_launch("off").initialize is False
    with pytest.raises(LaunchError, match="--distributed=on but nothing names a coordinator.*--coordinator_address"):
        distributed.plan_launch("on")
    with pytest.raises(LaunchError, match="--distributed='yes': use one of auto, on, off"):
        distributed.plan_launch("yes")


def test_coordinator_flags_and_jax_variables(monkeypatch):
    launch = distributed.plan_launch("auto", "10.0.0.2:1234", 4, 3)
    assert launch == Launch(True, "flags", "10.0.0.2:1234", 4, 3, None)
    set_env(
        monkeypatch,
        JAX_COORDINATOR_ADDRESS="host0:999",
        JAX_NUM_PROCESSES=2,
        JAX_PROCESS_ID=1,
        JAX_LOCAL_DEVICE_IDS="2,3",
    )
    assert distributed.plan_launch("auto") == Launch(True, "environment", "host0:999", 2, 1, (2, 3))
    # One process named explicitly: nothing to initialise unless asked.
    assert distributed.plan_launch("auto", "h:1", 1, 0).initialize is False
    assert distributed.plan_launch("on", "h:1", 1, 0).initialize is True
    with pytest.raises(LaunchError, match="--distributed=off but this is process 1 of 2"):
        distributed.plan_launch("off")
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    with pytest.raises(LaunchError, match="--num_processes is not given"):
        distributed.plan_launch("auto")
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    with pytest.raises(LaunchError, match="--num_processes=4 but no coordinator"):
        distributed.plan_launch("auto", None, 4, 0)
    with pytest.raises(LaunchError, match=r"--process_id=5 is outside \[0, --num_processes=4\)"):
        distributed.plan_launch("auto", "h:1", 4, 5)


# ------------------------------------------------------------------------------------------
# SLURM
# ------------------------------------------------------------------------------------------


def test_slurm_one_task_per_node_drives_all_eight_gpus(monkeypatch):
    slurm_env(monkeypatch, nodes=4, tasks_per_node=1, procid=2, gpus_visible=range(8))
    launch = distributed.plan_launch("auto")
    assert launch.initialize and launch.source == "slurm"
    assert (launch.num_processes, launch.process_id) == (4, 2)
    assert launch.local_device_ids == tuple(range(8))  # JAX alone would give (SLURM_LOCALID,) = (0,)
    # The first node of the step, on JAX's port for the job id.
    assert launch.coordinator_address == f"gpu001:{4242 % 4096 + 65535 - 4096 + 1}"
    assert (launch.expected_devices, launch.expected_from) == (32, "SLURM: 4 nodes x 8 GPUs")
    with pytest.raises(LaunchError, match="--distributed=off but this is process 2 of 4"):
        distributed.plan_launch("off")


def test_a_single_slurm_task_runs_alone_on_every_gpu_of_its_node(monkeypatch):
    slurm_env(monkeypatch, nodes=1, tasks_per_node=1, procid=0, gpus_visible=range(8))
    launch = distributed.plan_launch("auto")
    assert not launch.initialize and launch.local_device_ids == tuple(range(8)) and launch.expected_devices == 8


@pytest.mark.parametrize("bound", [False, True], ids=["all-gpus-visible", "gpu-bind-per-task"])
def test_slurm_one_task_per_gpu_drives_one_gpu(monkeypatch, bound):
    """--ntasks-per-node=8: each task sees the node's 8 GPUs and takes its own, or srun
    bound it to one GPU already (--gpus-per-task=1) and it takes the one it sees."""
    slurm_env(monkeypatch, nodes=2, tasks_per_node=8, procid=13, gpus_visible=[5] if bound else range(8))
    launch = distributed.plan_launch("auto")
    assert (launch.num_processes, launch.process_id) == (16, 13)
    assert launch.local_device_ids == ((0,) if bound else (5,))
    assert launch.expected_devices == 16


def test_slurm_tasks_that_do_not_share_the_gpus_evenly_are_refused(monkeypatch):
    slurm_env(monkeypatch, nodes=1, tasks_per_node=3, procid=1, gpus_visible=range(8))
    with pytest.raises(LaunchError, match="3 tasks on this node, which sees 8 GPUs.*--ntasks-per-node=1"):
        distributed.plan_launch("auto")


def test_python_run_outside_srun_in_a_slurm_job_is_one_process_checked_against_the_job(monkeypatch):
    """The batch script runs python itself (no srun): no job step, so one process, and the
    device check compares it with the 4 x 8 GPUs the job holds."""
    slurm_env(monkeypatch, nodes=4, tasks_per_node=1, procid=0, gpus_visible=range(8))
    for name in ("SLURM_STEP_NODELIST", "SLURM_STEP_NUM_NODES", "SLURM_STEP_TASKS_PER_NODE"):
        monkeypatch.delenv(name)
    launch = distributed.plan_launch("auto")
    assert not launch.initialize and launch.expected_devices == 32


# ------------------------------------------------------------------------------------------
# Cloud TPU VMs (the GCE metadata server, faked over HTTP)
# ------------------------------------------------------------------------------------------


class _MetadataHandler(http.server.BaseHTTPRequestHandler):
    PREFIX = "/computeMetadata/v1/instance/attributes/"

    def do_GET(self):  # noqa: N802 - the http.server name
        key = self.path[len(self.PREFIX) :] if self.path.startswith(self.PREFIX) else None
        value = self.server.attributes.get(key)
        if self.headers.get("Metadata-Flavor") != "Google" or value is None:
            self.send_response(404)
            self.end_headers()
            return
        body = value.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def tpu_vm(monkeypatch):
    """Returns a function that makes this process look like worker `worker` of a Cloud TPU
    VM slice: JAX's TPU-VM flag set, the GCE metadata server answering on 127.0.0.1."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MetadataHandler)
    server.attributes = {}
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)

    def make(accelerator, hosts, worker):
        server.attributes.update(
            {
                "accelerator-type": accelerator,
                "agent-worker-number": str(worker),
                # The format of TPU VMs made by gcloud: name:id:ip per worker.
                "worker-network-endpoints": ",".join(f"unknown:unknown:10.130.0.{i + 2}" for i in range(hosts)),
                "tpu-env": f"ACCELERATOR_TYPE: '{accelerator}'\nWORKER_ID: '{worker}'\n",
            }
        )

    yield make
    server.shutdown()


def test_a_tpu_pod_slice_always_initialises_with_jax_s_detection(tpu_vm):
    tpu_vm("v4-64", hosts=8, worker=5)
    launch = distributed.plan_launch("auto")
    assert launch.initialize and launch.source == "gcetpu"
    assert (launch.num_processes, launch.process_id, launch.local_device_ids) == (8, 5, None)
    assert (launch.expected_devices, launch.expected_from) == (32, "TPU: v4-64")  # 32 chips, megacore
    assert launch.coordinator_address is None  # JAX resolves worker 0 itself
    with pytest.raises(LaunchError, match="--distributed=off but this is process 5 of 8 .*TPU pod slice cannot"):
        distributed.plan_launch("off")


def test_a_single_host_tpu_vm_runs_one_process(tpu_vm):
    tpu_vm("v5litepod-8", hosts=1, worker=0)
    launch = distributed.plan_launch("auto")
    assert not launch.initialize and launch.expected_devices == 8


@pytest.mark.parametrize(
    "accelerator, devices",
    [
        ("v2-8", 8),
        ("v3-32", 32),
        ("v4-8", 4),
        ("v4-64", 32),
        ("v5p-8", 4),
        ("v5p-128", 64),
        ("v5litepod-16", 16),
        ("v6e-256", 256),
        ("V4-32", 16),
        ("tpu7x-8", None),
        ("v4", None),
    ],
)
def test_devices_per_tpu_accelerator_type(accelerator, devices):
    assert distributed.tpu_device_count(accelerator) == devices


# ------------------------------------------------------------------------------------------
# The device check
# ------------------------------------------------------------------------------------------


def test_a_run_with_fewer_devices_than_the_launcher_asked_for_stops_with_the_numbers(monkeypatch):
    slurm_env(monkeypatch, nodes=4, tasks_per_node=1, procid=0, gpus_visible=range(8))
    launch = distributed.plan_launch("auto")
    # What JAX's own SLURM default gives: 4 processes x 1 GPU.
    with pytest.raises(
        LaunchError, match=r"this process sees 1 local devices but was given GPUs \[0, 1, 2, 3, 4, 5, 6, 7\]"
    ):
        distributed.check_device_count(launch, global_devices=4, local_devices=1, process_count=4)
    single_gpu_default = Launch(True, "slurm", "gpu001:1", 4, 0, None, 32, "SLURM: 4 nodes x 8 GPUs")
    with pytest.raises(
        LaunchError,
        match=r"sees 4 devices \(4 processes x 1 local\) but SLURM: 4 nodes x 8 GPUs = 32.*one task per node",
    ):
        distributed.check_device_count(single_gpu_default, global_devices=4, local_devices=1, process_count=4)
    with pytest.raises(LaunchError, match="JAX reports 2 processes but the launcher \\(slurm\\) started 4"):
        distributed.check_device_count(launch, global_devices=16, local_devices=8, process_count=2)
    distributed.check_device_count(launch, global_devices=32, local_devices=8, process_count=4)
    # A v4-64 slice whose hosts each see 2 of their 4 chips.
    tpu = Launch(True, "gcetpu", None, 8, 0, None, 32, "TPU: v4-64")
    with pytest.raises(LaunchError, match=r"16 devices \(8 processes x 2 local\) but TPU: v4-64 = 32.*every worker"):
        distributed.check_device_count(tpu, global_devices=16, local_devices=2, process_count=8)


def test_start_on_one_process_checks_this_machine(monkeypatch, capsys):
    launch = distributed.start("auto")
    assert not launch.initialize
    assert "process 0 of 1 (single): 8 local / 8 global cpu devices" in capsys.readouterr().out
    # A single-node SLURM job for 16 GPUs seen as 8 CPU devices here: refused, with the numbers.
    set_env(monkeypatch, SLURM_JOB_ID=1, SLURM_JOB_NUM_NODES=2, SLURM_GPUS_PER_NODE=8)
    with pytest.raises(LaunchError, match=r"sees 8 devices \(1 process x 8 local\) but SLURM: 2 nodes x 8 GPUs = 16"):
        distributed.start("auto")


# ------------------------------------------------------------------------------------------
# Real processes
# ------------------------------------------------------------------------------------------


def child_env(**extra):
    """The environment of a child process: this checkout first on the path, no launcher
    variables of the parent."""
    env = {k: v for k, v in os.environ.items() if not (k.startswith(CLEARED_PREFIXES) or k in CLEARED)}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def test_two_slurm_tasks_start_jax_distributed_from_the_environment_alone():
    """Two processes with what srun gives two tasks on one node (4 CPU devices each): start()
    alone joins them into one run of 2 processes and 8 devices."""
    code = textwrap.dedent("""
        from vicregl_jax import distributed
        import jax
        launch = distributed.start("auto")
        print("RESULT", jax.process_index(), jax.process_count(), jax.device_count(), launch.source, flush=True)
    """)
    port = free_port()
    procs = []
    for task in range(2):
        env = child_env(
            SLURM_JOB_ID=7,
            SLURM_STEP_NODELIST="localhost",
            SLURM_NTASKS=2,
            SLURM_PROCID=task,
            SLURM_LOCALID=task,
            SLURM_NODEID=0,
            SLURM_STEP_NUM_NODES=1,
            SLURM_STEP_TASKS_PER_NODE="2",
            JAX_COORDINATOR_PORT=port,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=xla_flags(4),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for task, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, out[-3000:]
        assert f"RESULT {task} 2 8 slurm" in out, out[-3000:]
        assert f"process {task} of 2 (slurm): 4 local / 8 global cpu devices" in out


def test_a_second_process_finds_the_compiled_executable_in_the_cache(tmp_path):
    code = textwrap.dedent("""
        import sys
        import jax, jax.numpy as jnp
        from vicregl_jax import distributed
        hits = []
        jax.monitoring.register_event_listener(
            lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
        print("CACHE", distributed.enable_compilation_cache(None, workdir=sys.argv[1]))
        jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)(jnp.ones((64, 64))).block_until_ready()
        print("HITS", len(hits), flush=True)
    """)
    env = child_env(JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    outputs = []
    for _ in range(2):
        run = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr[-3000:]
        outputs.append(run.stdout)
    cache = tmp_path / "run" / "compilation_cache"
    assert f"CACHE {cache}" in outputs[0]
    hits = [int(out.split("HITS")[1]) for out in outputs]
    assert hits[0] == 0 and hits[1] >= 1, outputs  # the first compiles and writes, the second reads
    assert any(cache.iterdir())


def test_compilation_cache_defaults_and_off(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert distributed.default_compilation_cache_dir(None) == str(tmp_path / "vicregl_jax" / "compilation_cache")
    assert distributed.default_compilation_cache_dir("gs://bucket/run1/") == "gs://bucket/run1/compilation_cache"
    assert distributed.default_compilation_cache_dir("runs/a") == os.path.abspath("runs/a/compilation_cache")
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache)
    try:
        assert distributed.enable_compilation_cache("off") is None
        assert jax.config.jax_enable_compilation_cache is False
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_enable_compilation_cache", before[1])
