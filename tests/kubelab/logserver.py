"""The one kubelet endpoint the plugin needs: container logs, for its failure reports.

The API server serves ``pods/log`` by asking the node's kubelet on port 10250 (HTTPS at the
node's InternalIP). This answers ``GET /containerLogs/<namespace>/<pod>/<container>`` with the
tail of the mini kubelet's log file of that pod, from a socket in the node's network namespace.
"""

from __future__ import annotations

import http.server
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from .forward import socket_in_netns

KUBELET_PORT = 10250
LogPath = Callable[[str, str], "Path | None"]


class KubeletLogServer:
    """HTTPS on ``address``:10250 inside ``netns``; ``log_path(namespace, pod)`` finds the file."""

    def __init__(self, netns: str, address: str, log_path: LogPath, work_dir: Path) -> None:
        self.netns = netns
        self.address = address
        self.log_path = log_path
        self.work_dir = work_dir
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*self._certificate())
        sock = socket_in_netns(self.netns)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.address, KUBELET_PORT))
        sock.listen(16)
        server = http.server.ThreadingHTTPServer((self.address, KUBELET_PORT), _handler(self.log_path), False)
        server.socket.close()
        server.socket = context.wrap_socket(sock, server_side=True)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="kubelet-logs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _certificate(self) -> tuple[str, str]:
        """A self-signed serving certificate (the API server does not verify kubelets unless told to)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        cert, key = self.work_dir / "kubelet.crt", self.work_dir / "kubelet.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=svctunnel-lab-kubelet",
             "-addext", f"subjectAltName=IP:{self.address}"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        return str(cert), str(key)


def _handler(log_path: LogPath) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            parts = url.path.strip("/").split("/")
            if len(parts) != 4 or parts[0] != "containerLogs":
                self.send_error(404, "only /containerLogs/<namespace>/<pod>/<container>")
                return
            path = log_path(parts[1], parts[2])
            if path is None or not path.exists():
                self.send_error(404, f"no running pod {parts[1]}/{parts[2]} on this node")
                return
            lines = path.read_text(errors="replace").splitlines(keepends=True)
            tail = parse_qs(url.query).get("tailLines")
            body = "".join(lines[-int(tail[0]) :] if tail else lines).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    return Handler
