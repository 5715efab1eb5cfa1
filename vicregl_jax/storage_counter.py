"""A counting plain-HTTP forwarder on loopback, for measuring what a reader asks of a bucket.

ArrayRecord's reader (google-cloud-cpp) talks to the Storage emulator directly, at
CLOUD_STORAGE_EMULATOR_ENDPOINT, not through the emulator's HTTPS proxy (whose counter sees
TensorFlow's requests only). Pointing that variable at a `RequestCounter` in front of the
emulator counts its requests and the bytes of their responses; everything else passes on
unchanged. Used by benchmarks/storage_bench.py and the tests of block reads. google-cloud-cpp
reads the variable when its first client is made: set it before the process opens any gs://
ArrayRecord file.
"""

from __future__ import annotations

import socket
import socketserver
import threading

from vicregl_jax.storage_proxy import _header, _read_head, _relay_body


class _CountingHandler(socketserver.StreamRequestHandler):
    def handle(self):
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with socket.create_connection(("127.0.0.1", self.server.upstream_port)) as upstream:
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            from_upstream = upstream.makefile("rb")
            try:
                while True:
                    request = _read_head(self.rfile)
                    if not request:
                        return
                    self.server.count(request[0])
                    upstream.sendall(b"".join(request) + b"\r\n")
                    _relay_body(request, self.rfile, upstream.sendall, until_close=False)
                    response = _read_head(from_upstream)
                    if not response:
                        return
                    self.wfile.write(b"".join(response) + b"\r\n")
                    reads_data = request[0].startswith(b"GET ") and b"alt=media" in request[0]

                    def send(block, reads_data=reads_data):
                        if reads_data:
                            self.server.count_bytes(len(block))
                        self.wfile.write(block)

                    if not (request[0].startswith(b"HEAD ") or int(response[0].split()[1]) in (204, 304)):
                        _relay_body(response, from_upstream, send, until_close=True)
                    self.wfile.flush()
                    if (_header(response, b"connection") or b"").lower() == b"close":
                        return
            except (OSError, ValueError, ConnectionError):
                return


class RequestCounter(socketserver.ThreadingTCPServer):
    """Forwards HTTP/1.1 requests from 127.0.0.1:`port` to 127.0.0.1:`upstream_port`, counting
    them: `requests` (all), `reads` (GETs of object data, `alt=media`) and `read_bytes` (the
    bytes of their bodies). `start()` serves in a thread; `reset()` zeroes the counts."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream_port: int, port: int = 0):
        super().__init__(("127.0.0.1", port), _CountingHandler)
        self.upstream_port = upstream_port
        self._lock = threading.Lock()
        self.reset()

    @property
    def url(self) -> str:
        """Returns the counter's http:// address (what CLOUD_STORAGE_EMULATOR_ENDPOINT should name)."""
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> RequestCounter:
        """Serves in a daemon thread; returns self."""
        threading.Thread(target=self.serve_forever, name="storage-request-counter", daemon=True).start()
        return self

    def reset(self) -> None:
        """Zeroes the counts."""
        with self._lock:
            self.requests = self.reads = self.read_bytes = 0

    def count(self, request_line: bytes) -> None:
        """Counts one request (as it starts: a download the reader stops early counts too)."""
        with self._lock:
            self.requests += 1
            if request_line.startswith(b"GET ") and b"alt=media" in request_line:
                self.reads += 1

    def count_bytes(self, size: int) -> None:
        """Counts bytes of object data passed to the reader."""
        with self._lock:
            self.read_bytes += size
