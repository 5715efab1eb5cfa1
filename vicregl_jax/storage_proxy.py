"""The loopback proxy in front of the Storage emulator, through which every client reaches it,
and which can make the bucket have a bad day.

- TensorFlow's gs:// file system, whose Google hosts are fixed in its binary, comes as an HTTPS
  proxy client (CONNECT): the proxy ends TLS with the emulator's self-signed certificate,
  refuses every host but Google's storage hosts, and passes requests on unchanged but for
  `Transfer-Encoding: identity` (which Go's HTTP server refuses) and the server's upload
  Locations (made https://, as Cloud Storage's are).
- TensorStore, ArrayRecord's reader and google-cloud-storage, whose endpoints are settings,
  send plain HTTP requests to it, passed on unchanged.

Counts (`Proxy.traffic`): each client's requests, data reads and bytes of object data, which
is how tests and benchmarks measure what a reader asks of a bucket.

Faults (`Proxy.inject`): for the next N requests or for T seconds, requests whose request line
contains a given text get a 429 or a 503 answer, or their connection is dropped, instead of
reaching the server. Used by vicregl_jax.storage_emulator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import socketserver
import ssl
import threading
import time
import urllib.parse

GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
FAULT_KINDS = ("429", "503", "drop")
_REASONS = {"429": "Too Many Requests", "503": "Service Unavailable"}
# The clients, told apart by how they come (TensorFlow: CONNECT) and their User-Agent's start.
CLIENTS = {
    "tensorstore": b"tensorstore/",
    "google-cloud-storage": b"gcloud-python/",
    "arrayrecord": b"gl-cpp/",  # google-cloud-cpp, inside ArrayRecord's reader
}
TENSORFLOW = "tensorflow"


def client_of(request: list[bytes], tls: bool) -> str:
    """Returns which library sent a request: one of CLIENTS, "tensorflow", or "other"."""
    if tls:
        return TENSORFLOW
    agent = _header(request, b"user-agent") or b""
    return next((name for name, start in CLIENTS.items() if agent.startswith(start)), "other")


@dataclasses.dataclass
class Fault:
    """A scenario: `kind` ("429", "503" or "drop") for the next `requests` requests whose request
    line (method and path, URL-decoded) contains `match` and that come from `client` (a name of
    CLIENTS, "tensorflow", or "" for all), or for every such request until `seconds` have passed
    (both given: whichever ends first). `injected` counts the requests it hit."""

    kind: str
    requests: int | None = None
    seconds: float | None = None
    match: str = ""
    client: str = ""
    injected: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)

    def __post_init__(self):
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {self.kind!r}: use one of {', '.join(FAULT_KINDS)}.")
        if self.client not in ("", TENSORFLOW, *CLIENTS):
            raise ValueError(f"fault client {self.client!r}: use one of {TENSORFLOW}, {', '.join(CLIENTS)} or ''.")
        if self.requests is None and self.seconds is None:
            raise ValueError("a fault needs requests=N (the next N requests) or seconds=T (for T seconds), or both.")

    @property
    def active(self) -> bool:
        """Returns whether the fault still hits requests."""
        if self.requests is not None and self.injected >= self.requests:
            return False
        return self.seconds is None or time.monotonic() - self.started < self.seconds


@dataclasses.dataclass(frozen=True)
class Traffic:
    """What a client asked of the bucket through the proxy: its requests (faulted ones included),
    its data reads (GETs of object data, `alt=media`, passed to the server) and the bytes of
    object data they brought (counted as they pass: a download the client drops early counts
    what had passed). Subtract two to count what happened in between."""

    requests: int = 0
    reads: int = 0
    read_bytes: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


def _is_data_read(request_line: bytes) -> bool:
    return request_line.startswith(b"GET ") and b"alt=media" in request_line


def _read_head(stream) -> list[bytes] | None:
    """Returns the lines of an HTTP message's start line and headers (None at end of stream)."""
    lines = []
    while True:
        line = stream.readline(1 << 16)
        if not line:
            return None if not lines else lines
        if line in (b"\r\n", b"\n"):
            return lines
        lines.append(line)


def _header(lines: list[bytes], name: bytes) -> bytes | None:
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _relay_body(lines: list[bytes], source, send, *, until_close: bool) -> None:
    """Passes on the body that follows a message's head: chunked, sized, or up to the close."""
    if (_header(lines, b"transfer-encoding") or b"").lower() == b"chunked":
        while True:
            size_line = source.readline(1 << 16)
            send(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, up to the empty line
                    trailer = source.readline(1 << 16)
                    send(trailer)
                    if trailer in (b"\r\n", b"\n", b""):
                        return
            send(source.read(size + 2))
    length = _header(lines, b"content-length")
    if length is not None:
        remaining = int(length)
        while remaining:
            block = source.read(min(remaining, 1 << 20))
            if not block:
                raise ConnectionError("the stream ended inside a message")
            send(block)
            remaining -= len(block)
    elif until_close:
        while block := source.read1(1 << 20):
            send(block)


class _ProxyHandler(socketserver.StreamRequestHandler):
    rbufsize = 0  # the TLS handshake follows CONNECT: no byte of it may sit in a buffer here

    def handle(self):
        head = _read_head(self.rfile)
        if not head:
            return
        method, target = (head[0].split() + [b"", b""])[:2]
        if method != b"CONNECT" and target.startswith(b"/"):  # a client that names the endpoint: plain HTTP
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with socket.create_connection(("127.0.0.1", self.server.upstream_port)) as upstream:
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # Unbuffered so far (rbufsize 0): no byte after the head was read yet.
                self._serve(self.connection, upstream, first=head, tls=False)
            return
        host = target.decode("latin-1").rsplit(":", 1)[0]
        if method != b"CONNECT" or host not in GOOGLE_HOSTS:
            self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        # Heads and bodies go out in separate writes: without NODELAY each would wait for the
        # peer's delayed ACK (40 ms a request).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        try:
            client = self.server.tls.wrap_socket(self.connection, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with client, socket.create_connection(("127.0.0.1", self.server.upstream_port)) as upstream:
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._serve(client, upstream)

    def _serve(self, client, upstream, first=None, tls=True):
        """Passes requests and their responses on one at a time (HTTP/1.1 without pipelining,
        as the clients send them) until either side closes; answers the faulted ones itself.
        first: the head of the first request, already read; tls: a TensorFlow client (CONNECT)."""
        from_client, from_upstream = client.makefile("rb"), upstream.makefile("rb")
        try:
            while True:
                request, first = first or _read_head(from_client), None
                if not request:
                    return
                client_name = client_of(request, tls)
                fault = self.server.count(request[0], client_name)
                if request[0].startswith(b"POST /upload/") and self.server.upload_delay_s:
                    time.sleep(self.server.upload_delay_s)  # a slow link, for tests that stop an upload
                expect = (_header(request, b"expect") or b"").lower() == b"100-continue"
                if fault is not None:
                    if not _answer_fault(fault, request, from_client, client, expect):
                        return
                    continue
                kept = [
                    line
                    for line in request
                    if not _is_identity_encoding(line) and not (expect and line.lower().startswith(b"expect:"))
                ]
                upstream.sendall(b"".join(kept) + b"\r\n")
                if expect:  # answered here: the server never sees the Expect header
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                _relay_body(kept, from_client, upstream.sendall, until_close=False)
                while True:
                    response = _read_head(from_upstream)
                    if not response:
                        return
                    lines = [_https_location(line) for line in response] if tls else response
                    client.sendall(b"".join(lines) + b"\r\n")
                    status = int(response[0].split()[1])
                    if status >= 200:
                        break
                if not (request[0].startswith(b"HEAD ") or status in (204, 304)):
                    send = client.sendall
                    if _is_data_read(request[0]):
                        self.server.count_read(client_name)
                        send = self.server.counting_send(client_name, client.sendall)
                    _relay_body(response, from_upstream, send, until_close=True)
                if (_header(response, b"connection") or b"").lower() == b"close":
                    return
        except (OSError, ValueError, ConnectionError):
            return


def _answer_fault(kind: str, request: list[bytes], from_client, client, expect: bool) -> bool:
    """Answers a faulted request with 429 / 503 or drops its connection; returns whether the
    connection goes on."""
    if kind == "drop":
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)
        return False
    # A client waiting for 100 Continue has not sent its body: answered at once and closed, as
    # Cloud Storage may; otherwise the body is read and dropped and the connection kept.
    if not expect:
        _relay_body(request, from_client, lambda _: None, until_close=False)
    body = json.dumps({"error": {"code": int(kind), "message": f"injected {kind} (storage emulator's proxy)"}})
    client.sendall(
        f"HTTP/1.1 {kind} {_REASONS[kind]}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"{'Connection: close' if expect else 'Connection: keep-alive'}\r\n\r\n{body}".encode()
    )
    return not expect


def _https_location(line: bytes) -> bytes:
    # The server builds an upload's Location from the Host header, with its own scheme (http);
    # Cloud Storage answers https://, which is where TensorFlow must send the upload (through
    # this proxy again).
    key, _, value = line.partition(b":")
    if key.strip().lower() == b"location" and value.strip().startswith(b"http://"):
        return key + b": https://" + value.strip()[len(b"http://") :] + b"\r\n"
    return line


def _is_identity_encoding(line: bytes) -> bool:
    key, _, value = line.partition(b":")
    return key.strip().lower() == b"transfer-encoding" and value.strip().lower() == b"identity"


class Proxy(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, upstream_port: int, cert: str, key: str):
        super().__init__(("127.0.0.1", port), _ProxyHandler)
        self.upstream_port = upstream_port
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)
        self.upload_delay_s = 0.0
        self._traffic: dict[str, Traffic] = {}
        self.faults: list[Fault] = []
        self._lock = threading.Lock()

    def inject(self, fault: Fault) -> Fault:
        """Adds a fault scenario (it hits requests from now on); returns it."""
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Ends every fault scenario."""
        with self._lock:
            self.faults = []

    def traffic(self, client: str = "") -> Traffic:
        """Returns what `client` (a name of CLIENTS, "tensorflow", "other"; "" for all) sent so far."""
        with self._lock:
            return sum((t for name, t in self._traffic.items() if client in ("", name)), Traffic())

    def _add(self, client: str, traffic: Traffic) -> None:
        self._traffic[client] = self._traffic.get(client, Traffic()) + traffic

    def count_read(self, client: str) -> None:
        """Counts a data read passed to the server."""
        with self._lock:
            self._add(client, Traffic(reads=1))

    def counting_send(self, client: str, send):
        """Returns send, counting the bytes it passes as `client`'s object data."""

        def counted(block: bytes) -> None:
            with self._lock:
                self._add(client, Traffic(read_bytes=len(block)))
            send(block)

        return counted

    def count(self, request_line: bytes, client: str) -> str | None:
        """Counts a request; returns the kind of fault it gets, or None (it goes to the server)."""
        line = urllib.parse.unquote(request_line.decode("latin-1"))
        with self._lock:
            self._add(client, Traffic(requests=1))
            for fault in self.faults:
                if fault.active and fault.match in line and fault.client in ("", client):
                    fault.injected += 1
                    return fault.kind
        return None
