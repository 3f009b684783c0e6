"""Prometheus metrics without a dependency: a registry and a tiny HTTP server.

``Registry`` holds counters, gauges and histograms and renders them in the
Prometheus text exposition format 0.0.4. Every metric has a hard cap on the
number of label-value combinations: once it is reached, new combinations are
folded into one series whose labels all read ``_overflow``, and each fold is
counted in ``eplbd_metrics_overflow_total{metric=...}``. A misbehaving peer
(say, a worker that invents a new rank id every second) thus cannot grow the
daemon's memory or the scrape without bound.

``MetricsServer`` serves ``/metrics``, ``/healthz`` and ``/readyz`` over
HTTP/1.1 with ``asyncio.start_server`` (works under uvloop and the default
loop). One request per connection; a malformed, oversized or slow request
gets an error status and a closed connection, never a dead server.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Sequence

log = logging.getLogger(__name__)

PREFIX = "eplbd_"
OVERFLOW = "_overflow"
DEFAULT_MAX_SERIES = 64
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def _fmt(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labelstr(pairs: Iterable[tuple[str, str]]) -> str:
    body = ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs)
    return "{" + body + "}" if body else ""


class _Child:
    """One series (one label-value combination) of a counter or gauge."""

    __slots__ = ("_lock", "value")

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self.value: float = 0

    def inc(self, amount: float = 1) -> None:
        with self._lock:
            self.value += amount

    def dec(self, amount: float = 1) -> None:
        with self._lock:
            self.value -= amount

    def set(self, value: float) -> None:
        with self._lock:
            self.value = value


class _CounterChild(_Child):
    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up; inc({amount!r})")
        super().inc(amount)

    def dec(self, amount: float = 1) -> None:
        raise AttributeError("a counter cannot be decremented")

    def set(self, value: float) -> None:
        raise AttributeError("a counter cannot be set")


class _HistogramChild:
    __slots__ = ("_lock", "_bounds", "counts", "sum", "count")

    def __init__(self, lock: threading.Lock, bounds: tuple[float, ...]) -> None:
        self._lock = lock
        self._bounds = bounds
        self.counts = [0] * len(bounds)  # per bucket, not cumulative
        self.sum: float = 0
        self.count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            for i, bound in enumerate(self._bounds):
                if value <= bound:
                    self.counts[i] += 1
                    break
            self.sum += value
            self.count += 1


class Metric:
    """A named metric with a fixed set of label names and bounded series.

    Use ``metric.labels(rank="3").inc()``; a metric without label names takes
    ``inc``/``set``/``observe`` directly.
    """

    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str], max_series: int,
                 on_overflow: Callable[[str], None] | None) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self.max_series = max_series
        self._on_overflow = on_overflow
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], object] = {}
        self._overflow: object | None = None
        if not self.labelnames:
            self._children[()] = self._new_child()

    def _new_child(self) -> object:
        raise NotImplementedError

    def labels(self, **kv: object):
        """Returns: the series for these label values (the overflow series past the cap).

        Raises:
            ValueError: the label names differ from the metric's.
        """
        if set(kv) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(kv)} != {sorted(self.labelnames)}")
        key = tuple(str(kv[n]) for n in self.labelnames)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                if len(self._children) < self.max_series:
                    child = self._children[key] = self._new_child()
                else:
                    if self._overflow is None:
                        self._overflow = self._new_child()
                    child = self._overflow
        if child is self._overflow and self._on_overflow is not None:
            self._on_overflow(self.name)
        return child

    def remove(self, **kv: object) -> None:
        """Drop one series (e.g. when a rank leaves), freeing room under the cap."""
        key = tuple(str(kv[n]) for n in self.labelnames)
        with self._lock:
            self._children.pop(key, None)

    def _series(self) -> list[tuple[tuple[tuple[str, str], ...], object]]:
        with self._lock:
            items = [(tuple(zip(self.labelnames, k)), c) for k, c in self._children.items()]
            if self._overflow is not None:
                items.append((tuple((n, OVERFLOW) for n in self.labelnames), self._overflow))
        return items

    def _unlabelled(self):
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {list(self.labelnames)}; use .labels(...)")
        return self._children[()]

    def render(self) -> list[str]:
        """Returns: the metric's exposition lines (HELP, TYPE, samples)."""
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for pairs, child in self._series():
            lines.append(f"{self.name}{_labelstr(pairs)} {_fmt(child.value)}")
        return lines


class Counter(Metric):
    """A value that only goes up (name it ``..._total``)."""

    kind = "counter"

    def _new_child(self) -> _CounterChild:
        return _CounterChild(self._lock)

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (>= 0) to the unlabelled series."""
        self._unlabelled().inc(amount)


class Gauge(Metric):
    """A value that goes up and down."""

    kind = "gauge"

    def _new_child(self) -> _Child:
        return _Child(self._lock)

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` to the unlabelled series."""
        self._unlabelled().inc(amount)

    def dec(self, amount: float = 1) -> None:
        """Subtract ``amount`` from the unlabelled series."""
        self._unlabelled().dec(amount)

    def set(self, value: float) -> None:
        """Set the unlabelled series to ``value``."""
        self._unlabelled().set(value)


class Histogram(Metric):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str],
                 max_series: int, on_overflow: Callable[[str], None] | None) -> None:
        bounds = [float(b) for b in buckets]
        if not bounds or any(b >= c for b, c in zip(bounds, bounds[1:])):
            raise ValueError(f"{name}: buckets must be non-empty and strictly increasing, got {list(buckets)}")
        if "le" in labelnames:
            raise ValueError(f"{name}: 'le' is reserved for histogram buckets")
        if bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        super().__init__(name, help, labelnames, max_series, on_overflow)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self._lock, self.bounds)

    def observe(self, value: float) -> None:
        """Record one observation in the unlabelled series."""
        self._unlabelled().observe(value)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for pairs, child in self._series():
            with self._lock:  # one consistent snapshot of buckets, sum and count
                counts, total, count = list(child.counts), child.sum, child.count
            cumulative = 0
            for bound, n in zip(self.bounds, counts):
                cumulative += n
                lines.append(f"{self.name}_bucket{_labelstr(pairs + (('le', _fmt(bound)),))} {cumulative}")
            lines.append(f"{self.name}_sum{_labelstr(pairs)} {_fmt(total)}")
            lines.append(f"{self.name}_count{_labelstr(pairs)} {count}")
        return lines


class Registry:
    """The daemon's metrics, rendered together on ``/metrics``.

    Args:
        max_series: label-value combinations kept per metric before overflow.
    """

    def __init__(self, max_series: int = DEFAULT_MAX_SERIES) -> None:
        self.max_series = max_series
        self._lock = threading.Lock()
        self._metrics: dict[str, Metric] = {}
        # Bounded by the number of metrics, so it needs no cap of its own.
        self.overflow = Counter(PREFIX + "metrics_overflow_total",
                                "Label sets folded into the _overflow series because a metric hit its cap.",
                                ("metric",), max_series=1 << 30, on_overflow=None)
        self._metrics[self.overflow.name] = self.overflow

    def _add(self, cls: type[Metric], name: str, help: str, labelnames: Sequence[str],
             make: Callable[[], Metric]) -> Metric:
        if not name.startswith(PREFIX) or not _NAME_RE.match(name):
            raise ValueError(f"metric name {name!r} must match {_NAME_RE.pattern} and start with {PREFIX!r}")
        for label in labelnames:
            if not _LABEL_RE.match(label) or label.startswith("__"):
                raise ValueError(f"{name}: bad label name {label!r}")
        with self._lock:
            existing = self._metrics.get(name)
            if existing is not None:
                # Asking twice for the same metric is fine (two modules may share one).
                if type(existing) is cls and existing.labelnames == tuple(labelnames):
                    return existing
                raise ValueError(f"metric {name!r} already registered as a {existing.kind} "
                                 f"with labels {list(existing.labelnames)}")
            metric = self._metrics[name] = make()
            return metric

    def _count_overflow(self, name: str) -> None:
        self.overflow.labels(metric=name).inc()

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        """Returns: the counter ``name`` (created on first use). Name it ``eplbd_..._total``."""
        return self._add(Counter, name, help, labelnames, lambda: Counter(
            name, help, labelnames, self.max_series, self._count_overflow))  # type: ignore[return-value]

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        """Returns: the gauge ``name`` (created on first use)."""
        return self._add(Gauge, name, help, labelnames, lambda: Gauge(
            name, help, labelnames, self.max_series, self._count_overflow))  # type: ignore[return-value]

    def histogram(self, name: str, help: str, buckets: Sequence[float],
                  labelnames: Sequence[str] = ()) -> Histogram:
        """Returns: the histogram ``name`` with these upper bounds (``+Inf`` is added)."""
        return self._add(Histogram, name, help, labelnames, lambda: Histogram(
            name, help, buckets, labelnames, self.max_series, self._count_overflow))  # type: ignore[return-value]

    def render(self) -> str:
        """Returns: every metric in the Prometheus text format 0.0.4."""
        with self._lock:
            metrics = list(self._metrics.values())
        lines: list[str] = []
        for metric in metrics:
            # Shown only once something overflowed, so a healthy scrape stays short.
            if metric is self.overflow and not metric._series():
                continue
            lines.extend(metric.render())
        return "\n".join(lines) + "\n" if lines else ""


# --- HTTP ---------------------------------------------------------------------

Check = Callable[[], tuple[bool, str]]
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}


class MetricsServer:
    """HTTP/1.1 server for ``/metrics``, ``/healthz`` and ``/readyz``.

    Args:
        registry: the metrics to render.
        host: address to bind.
        port: port to bind (0 = any free port; ``start`` returns the real one).
        health: returns ``(ok, reason)``; ``/healthz`` answers 200 or 503 with the reason.
        ready: the same for ``/readyz``.
        read_timeout_s: a client must send its whole request head within this time.
        max_request_bytes: the largest request head accepted (line plus headers).
        max_connections: connections served at once; more are closed at once.
    """

    def __init__(self, registry: Registry, host: str, port: int, health: Check, ready: Check, *,
                 read_timeout_s: float = 5.0, max_request_bytes: int = 8192, max_connections: int = 64) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._health = health
        self._ready = ready
        self.read_timeout_s = read_timeout_s
        self.max_request_bytes = max_request_bytes
        self.max_connections = max_connections
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> int:
        """Bind and start serving.

        Returns:
            The bound port.
        """
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  limit=self.max_request_bytes)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics server on http://%s:%d/metrics", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop accepting, cancel requests in flight, and wait until closed."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._tasks) >= self.max_connections:
            writer.close()
            return
        self._tasks.add(task)
        try:
            status, headers, body, head_only = await self._respond(reader)
            await self._write(writer, status, headers, body, head_only)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        except asyncio.CancelledError:
            pass  # stop() cancels requests in flight; end quietly
        except Exception:  # a bug in a handler must not take the server down
            log.exception("metrics server: error while handling a request")
        finally:
            self._tasks.discard(task)
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (Exception, asyncio.CancelledError):
                pass

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes, bool]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout_s)
        except asyncio.TimeoutError:
            return 408, {}, b"request not received in time\n", False
        except asyncio.LimitOverrunError:
            return 431, {}, b"request head too large\n", False
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise ConnectionResetError from None  # client connected and left
            return 400, {}, b"incomplete request\n", False
        try:
            line = head.split(b"\r\n", 1)[0].decode("ascii")
            method, target, version = line.split(" ")
        except (UnicodeDecodeError, ValueError):
            return 400, {}, b"malformed request line\n", False
        if not version.startswith("HTTP/1."):
            return 400, {}, b"unsupported protocol version\n", False
        if method not in ("GET", "HEAD"):
            return 405, {"Allow": "GET, HEAD"}, b"only GET is supported\n", False
        head_only = method == "HEAD"
        path = target.split("?", 1)[0]
        if path == "/metrics":
            body = self.registry.render().encode("utf-8")
            return 200, {"Content-Type": CONTENT_TYPE}, body, head_only
        if path in ("/healthz", "/readyz"):
            check = self._health if path == "/healthz" else self._ready
            try:
                ok, reason = check()
            except Exception as exc:  # an unhealthy check is an answer, not a crash
                log.exception("metrics server: %s check raised", path)
                ok, reason = False, f"check raised {type(exc).__name__}: {exc}"
            text = (reason or ("ok" if ok else "not ok")) + "\n"
            return (200 if ok else 503), {}, text.encode("utf-8"), head_only
        return 404, {}, b"not found; try /metrics, /healthz or /readyz\n", head_only

    async def _write(self, writer: asyncio.StreamWriter, status: int, headers: dict[str, str],
                     body: bytes, head_only: bool) -> None:
        headers = {"Content-Type": "text/plain; charset=utf-8", **headers,
                   "Content-Length": str(len(body)), "Connection": "close"}
        head = f"HTTP/1.1 {status} {_REASONS[status]}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        writer.write(head.encode("ascii") + (b"" if head_only else body))
        # A client that does not read must not hold the connection forever.
        await asyncio.wait_for(writer.drain(), self.read_timeout_s)
