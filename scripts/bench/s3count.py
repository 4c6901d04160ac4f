"""A TCP forwarder on 127.0.0.1 that counts the S3 requests passing through it.

It does not parse HTTP: it forwards bytes both ways unchanged and looks, in the client's
stream, for request lines ("PUT /bucket/key HTTP/1.1"). Used by the benchmark's request
count pass to tell how many round trips each file operation costs a filesystem."""

from __future__ import annotations

import re
import socket
import threading
from collections import Counter
from urllib.parse import urlsplit

_REQ = re.compile(rb"(GET|PUT|HEAD|DELETE|POST) (/[^ \r\n]{0,1024}) HTTP/1\.[01]\r\n")
_TAIL = 1100


def classify(method: str, path: str) -> str:
    """'PUT log', 'GET data', 'LIST', ... from the request line (bucket/prefix stripped)."""
    path, _, query = path.partition("?")
    if method == "GET" and ("list-type" in query or path.rstrip("/").count("/") <= 1):
        return "LIST"
    for part in ("log", "data", "clients", "checkpoints", "superblock", "chunks", "meta"):
        if f"/{part}/" in path or path.endswith(f"/{part}"):
            return f"{method} {part}"
    return f"{method} other"


class CountingProxy:
    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        self.up = (u.hostname or "127.0.0.1", u.port or 80)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)

    def _accept(self) -> None:
        while not self._closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.up)
            except OSError:
                c.close()
                continue
            for s in (c, u):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        tail = b""
        try:
            while True:
                data = src.recv(262144)
                if not data:
                    break
                if count:
                    buf = tail + data
                    for m in _REQ.finditer(buf):
                        if m.end() > len(tail):
                            key = classify(m.group(1).decode(), m.group(2).decode("latin-1"))
                            with self._lock:
                                self.counts[key] += 1
                    tail = buf[-_TAIL:]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed = True
        self.sock.close()
