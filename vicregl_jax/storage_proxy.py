"""The loopback HTTPS proxy in front of the Storage emulator, for TensorFlow's gs:// file system,
whose Google hosts are fixed in its binary: it ends TLS with the emulator's self-signed
certificate, refuses every host but Google's storage hosts, and passes requests on unchanged
but for `Transfer-Encoding: identity` (which Go's HTTP server refuses) and the server's upload
Locations (made https://, as Cloud Storage's are). Used by vicregl_jax.storage_emulator.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
import time

GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")


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

    def _serve(self, client, upstream):
        """Passes requests and their responses on one at a time (HTTP/1.1 without pipelining,
        as libcurl sends them) until either side closes."""
        from_client, from_upstream = client.makefile("rb"), upstream.makefile("rb")
        try:
            while True:
                request = _read_head(from_client)
                if not request:
                    return
                self.server.count(request[0])
                if request[0].startswith(b"POST /upload/") and self.server.upload_delay_s:
                    time.sleep(self.server.upload_delay_s)  # a slow link, for tests that stop an upload
                expect = (_header(request, b"expect") or b"").lower() == b"100-continue"
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
                    client.sendall(b"".join(_https_location(line) for line in response) + b"\r\n")
                    status = int(response[0].split()[1])
                    if status >= 200:
                        break
                if not (request[0].startswith(b"HEAD ") or status in (204, 304)):
                    _relay_body(response, from_upstream, client.sendall, until_close=True)
                if (_header(response, b"connection") or b"").lower() == b"close":
                    return
        except (OSError, ValueError, ConnectionError):
            return


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
        self.requests = 0
        self.upload_delay_s = 0.0
        self._lock = threading.Lock()

    def count(self, _request_line: bytes) -> None:
        with self._lock:
            self.requests += 1
