"""The daemon's HTTP endpoint: ``/metrics`` (``prometheus_client``'s WSGI app) beside ``/healthz`` and ``/readyz``.

Served from a thread (``wsgiref`` with one thread per request, as ``prometheus_client.start_wsgi_server``
does), so a scrape never waits for the daemon's event loop; the probes' checks read the daemon's state,
so they run on that loop (``loop``) and answer 503 when it does not within ``check_timeout_s``. A slow
client is cut off after ``read_timeout_s``, at most ``max_connections`` are served at once, and a
malformed request gets an error status, never a dead server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]
_TEXT = ("Content-Type", "text/plain; charset=utf-8")


class _Handler(WSGIRequestHandler):
    default_request_version = "HTTP/1.0"  # errors and status-line-less requests still get a status line

    def setup(self) -> None:
        self.timeout = self.server.read_timeout_s  # StreamRequestHandler.setup sets it on the socket
        super().setup()

    def log_message(self, format: str, *args: object) -> None:
        log.debug("metrics server: %s " + format, self.address_string(), *args)


class _Server(ThreadingWSGIServer):
    """Thread per connection, at most ``max_connections`` at once; ``server_close`` also ends open ones."""

    max_connections = 64
    read_timeout_s = 5.0

    def __init__(self, *args, **kwargs) -> None:
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        with self._open_lock:
            full = len(self._open) >= self.max_connections
            if not full:
                self._open.add(request)
        if full:
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        super().server_close()
        with self._open_lock:
            still_open = list(self._open)
        for request in still_open:
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:
        # A client that timed out or went away is not the server's error; anything else is logged.
        log.debug("metrics server: request from %s failed", client_address, exc_info=True)


class MetricsServer:
    """HTTP server for ``/metrics``, ``/healthz`` and ``/readyz``.

    Args:
        registry: the metrics to serve.
        host: address to bind (IPv4 or IPv6).
        port: port to bind (0 = any free port; ``start`` returns the real one).
        health: returns ``(ok, reason)``; ``/healthz`` answers 200 or 503 with the reason.
        ready: the same for ``/readyz``.
        loop: where the checks run (they read state owned by that loop); None: in the request's thread.
        check_timeout_s: a check the loop has not run within this time answers 503.
        read_timeout_s: a client must send each part of its request within this time.
        max_connections: connections served at once; more are closed at once.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int, health: Check, ready: Check, *,
                 loop: asyncio.AbstractEventLoop | None = None, check_timeout_s: float = 4.0,
                 read_timeout_s: float = 5.0, max_connections: int = 64) -> None:
        self.host, self.port = host, port
        self._checks = {"/healthz": health, "/readyz": ready}
        self._loop = loop
        self.check_timeout_s = check_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self._metrics_app = make_wsgi_app(registry)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Bind and start serving in a thread.

        Returns:
            The bound port.

        Raises:
            OSError: the address cannot be resolved or bound.
        """
        infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, addr = infos[0][0], infos[0][4][0]

        class Server(_Server):  # the family must be known before the socket is made (IPv6 hosts)
            address_family = family
            max_connections = self.max_connections
            read_timeout_s = self.read_timeout_s

        self._httpd = make_server(addr, self.port, self._app, Server, handler_class=_Handler)
        self.port = self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="eplbd-metrics", daemon=True)
        self._thread.start()
        log.info("metrics server on http://%s:%d/metrics", self.host, self.port)
        return self.port

    def stop(self) -> None:
        """Stop accepting, end open connections, and wait for the serving thread (blocks briefly)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        self._thread.join(5)

    def _app(self, environ: dict, start_response: Callable) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [_TEXT, ("Allow", "GET, HEAD")])
            return [b"only GET is supported\n"]
        head_only = method == "HEAD"
        if path == "/metrics":
            if not head_only:
                return self._metrics_app(environ, start_response)
            captured: list = []
            body = b"".join(self._metrics_app({**environ, "REQUEST_METHOD": "GET"},
                                              lambda status, headers: captured.extend((status, headers))))
            start_response(captured[0], [*captured[1], ("Content-Length", str(len(body)))])
            return [b""]
        check = self._checks.get(path)
        if check is None:
            start_response("404 Not Found", [_TEXT])
            return [b"" if head_only else b"not found; try /metrics, /healthz or /readyz\n"]
        ok, reason = self._run_check(path, check)
        text = ((reason or ("ok" if ok else "not ok")) + "\n").encode("utf-8")
        start_response("200 OK" if ok else "503 Service Unavailable", [_TEXT, ("Content-Length", str(len(text)))])
        return [b"" if head_only else text]

    def _run_check(self, path: str, check: Check) -> tuple[bool, str]:
        """An unhealthy check is an answer, not a crash: one that raises or times out is 503 with why."""
        try:
            if self._loop is None:
                return check()
            future: concurrent.futures.Future = concurrent.futures.Future()

            def run() -> None:  # a plain callback, not a task: nothing is left pending if the loop closes
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(check())
                    except BaseException as exc:
                        future.set_exception(exc)

            self._loop.call_soon_threadsafe(run)
            try:
                return future.result(self.check_timeout_s)
            except TimeoutError:
                future.cancel()
                return False, f"the daemon's event loop did not answer within {self.check_timeout_s:g}s"
        except Exception as exc:
            log.exception("metrics server: %s check raised", path)
            return False, f"check raised {type(exc).__name__}: {exc}"
