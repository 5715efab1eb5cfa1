"""The Cloud TPU VM side of the pod in a box: each fake VM's metadata server (HTTP on a loopback
port, answering the paths JAX's and tpu_worker.sh's TPU detection read) and its PCI bus (the TPU
chips JAX looks for before it asks the metadata server anything).

JAX (jax/_src/cloud_tpu_init.py, clusters/cloud_tpu_cluster.py) finds a Cloud TPU pod slice in
three steps, each checked against the machine, none against an environment variable we could set:
1. `cloud_tpu_init` counts the PCI devices of Google's vendor id (0x1ae0) with a TPU device id
   under /sys/bus/pci/devices; with none it sets TPU_SKIP_MDS_QUERY=1 (never asks the metadata
   server) and, without libtpu (TPU_LIBRARY_PATH or the libtpu package), stops there.
2. `GceTpuCluster.is_env_present` asks http://$GCE_METADATA_IP/computeMetadata/v1/instance/
   attributes/agent-worker-number (header Metadata-Flavor: Google).
3. The process id is agent-worker-number, the process count and coordinator (the first
   worker) come from worker-network-endpoints, MEGASCALE_* from tpu-env; vicregl_jax.distributed
   reads accelerator-type for the device count the slice must show.

So a fake VM K here is: GCE_METADATA_IP=127.0.0.1:<port K> (JAX's own override of the metadata
host), /sys/bus/pci/devices replaced by a folder of fake v4 chips in a private mount namespace
(root: `unshare --mount`), and TPU_LIBRARY_PATH naming a placeholder file (JAX_PLATFORMS=cpu:
never loaded). The backend stays CPU; only the detection is the TPU's.
"""

import http.server
import os
import subprocess
import threading

# Google's PCI vendor id and TPU v4's device id (jax/_src/hardware_utils.py).
GOOGLE_VENDOR, TPU_V4_DEVICE = "0x1ae0", "0x005e"
CHIPS_PER_VM = 4


def missing() -> str | None:
    """Returns why a fake VM's PCI bus cannot be shown here (no private mount namespace), or None."""
    run = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True, check=False
    )
    if run.returncode != 0:
        return f"`unshare --mount` fails ({run.stderr.strip()}): the fake TPU VMs need root and a mount namespace"
    return None


def write_pci_bus(folder, real="/sys/bus/pci/devices") -> str:
    """Writes a folder to mount on /sys/bus/pci/devices: this machine's devices (the same
    relative links as sysfs's: gloo, JAX's CPU collectives, reads the network card's) and
    CHIPS_PER_VM TPU v4 chips; returns its path."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(real):
        os.symlink(os.readlink(os.path.join(real, name)), os.path.join(folder, name))
    for chip in range(CHIPS_PER_VM):
        device = os.path.join(folder, f"0000:{0xF0 + chip:02x}:00.0")
        os.makedirs(device, exist_ok=True)
        # class: a processing accelerator (gloo reads every device's class)
        for name, value in (("vendor", GOOGLE_VENDOR), ("device", TPU_V4_DEVICE), ("class", "0x120000")):
            with open(os.path.join(device, name), "w") as f:
                f.write(value + "\n")
    return str(folder)


def vm_command(pci_folder: str, command: str) -> list[str]:
    """Returns argv running `bash -c command` on a fake TPU VM: in a private mount namespace
    whose /sys/bus/pci/devices is pci_folder."""
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "bash",
        "-c",
        'mount --bind "$0" /sys/bus/pci/devices && exec bash -c "$1"',
        pci_folder,
        command,
    ]


class MetadataServers:
    """One metadata server per worker of the slice (worker K's on ports[K]), in threads of this
    process; the accelerator type is read at each request from the file the fake gcloud's
    create writes (state_dir/accelerator), so a recreated slice answers for itself."""

    def __init__(self, state_dir, workers: int):
        self.state_dir, self.workers = str(state_dir), workers
        self.servers = [self._server(k) for k in range(workers)]
        self.ports = [s.server_address[1] for s in self.servers]
        for server in self.servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def attributes(self, worker: int) -> dict[str, str]:
        """Returns worker's instance attributes as a TPU VM's metadata server gives them."""
        path = os.path.join(self.state_dir, "accelerator")
        accelerator = open(path).read().strip() if os.path.exists(path) else ""
        return {
            "agent-worker-number": str(worker),
            # The old format (name:id:ip); the coordinator is the first worker's address.
            "worker-network-endpoints": ",".join(f"unknown:unknown:127.0.0.{k + 1}" for k in range(self.workers)),
            "accelerator-type": accelerator,
            "tpu-env": f"ACCELERATOR_TYPE: '{accelerator}'\nWORKER_ID: '{worker}'\n",
        }

    def _server(self, worker: int):
        servers = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                prefix = "/computeMetadata/v1/instance/attributes/"
                value = servers.attributes(worker).get(self.path[len(prefix) :])
                if self.headers.get("Metadata-Flavor") != "Google":
                    self.send_response(403)  # what the real server says without the header
                    value = "Missing Metadata-Flavor:Google header."
                elif not self.path.startswith(prefix) or value is None:
                    self.send_response(404)
                    value = "not found"
                else:
                    self.send_response(200)
                body = value.encode()
                self.send_header("Metadata-Flavor", "Google")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        return http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def close(self) -> None:
        """Stops every server."""
        for server in self.servers:
            server.shutdown()
            server.server_close()
