import asyncio

import pytest
import uvloop

from eplbd.daemon.metrics import CONTENT_TYPE, MetricsServer, Registry

GOLDEN = """\
# HELP eplbd_reports_total Load reports received.
# TYPE eplbd_reports_total counter
eplbd_reports_total{rank="0"} 3
eplbd_reports_total{rank="1"} 0.5
# HELP eplbd_balancedness Observed balancedness\\nper layer.
# TYPE eplbd_balancedness gauge
eplbd_balancedness{layer="a\\"b\\\\c\\nd"} 0.75
# HELP eplbd_epoch Current epoch.
# TYPE eplbd_epoch gauge
eplbd_epoch 0
# HELP eplbd_plan_seconds Plan time.
# TYPE eplbd_plan_seconds histogram
eplbd_plan_seconds_bucket{policy="default",le="0.1"} 1
eplbd_plan_seconds_bucket{policy="default",le="1.0"} 2
eplbd_plan_seconds_bucket{policy="default",le="+Inf"} 3
eplbd_plan_seconds_sum{policy="default"} 5.55
eplbd_plan_seconds_count{policy="default"} 3
"""


def test_render_golden():
    reg = Registry()
    reports = reg.counter("eplbd_reports_total", "Load reports received.", ["rank"])
    reports.labels(rank=0).inc()
    reports.labels(rank=0).inc(2)
    reports.labels(rank="1").inc(0.5)
    reg.gauge("eplbd_balancedness", "Observed balancedness\nper layer.", ["layer"]).labels(
        layer='a"b\\c\nd').set(0.75)
    reg.gauge("eplbd_epoch", "Current epoch.")
    hist = reg.histogram("eplbd_plan_seconds", "Plan time.", [0.1, 1], ["policy"])
    for v in (0.05, 0.5, 5.0):
        hist.labels(policy="default").observe(v)
    assert reg.render() == GOLDEN


def test_unlabelled_histogram_and_gauge_ops():
    reg = Registry()
    h = reg.histogram("eplbd_h", "h", [1.0, float("inf")])
    h.observe(1.0)  # le is inclusive
    g = reg.gauge("eplbd_g", "g")
    g.set(5)
    g.inc(2)
    g.dec()
    text = reg.render()
    assert 'eplbd_h_bucket{le="1.0"} 1\neplbd_h_bucket{le="+Inf"} 1\n' in text
    assert text.count('le="+Inf"') == 1
    assert "eplbd_g 6\n" in text


def test_misuse_rejected():
    reg = Registry()
    c = reg.counter("eplbd_c_total", "c", ["rank"])
    with pytest.raises(ValueError, match="labels"):
        c.labels(node="x")
    with pytest.raises(ValueError, match="use .labels"):
        c.inc()
    with pytest.raises(ValueError, match="only goes up"):
        c.labels(rank=1).inc(-1)
    with pytest.raises(ValueError, match="start with 'eplbd_'"):
        reg.counter("reports_total", "r")
    with pytest.raises(ValueError, match="already registered"):
        reg.gauge("eplbd_c_total", "c", ["rank"])
    assert reg.counter("eplbd_c_total", "c", ["rank"]) is c
    with pytest.raises(ValueError, match="increasing"):
        reg.histogram("eplbd_h", "h", [2, 1])


def test_cardinality_cap():
    reg = Registry(max_series=4)
    c = reg.counter("eplbd_reports_total", "r", ["rank"])
    for rank in range(10):
        c.labels(rank=rank).inc()
    c.labels(rank=2).inc()  # an existing series is still served
    text = reg.render()
    series = [ln for ln in text.splitlines() if ln.startswith("eplbd_reports_total{")]
    assert len(series) == 5
    assert 'eplbd_reports_total{rank="2"} 2' in series
    assert 'eplbd_reports_total{rank="_overflow"} 6' in series
    assert 'eplbd_metrics_overflow_total{metric="eplbd_reports_total"} 6' in text
    c.remove(rank=0)  # frees room under the cap
    c.labels(rank=99).inc()
    assert 'eplbd_reports_total{rank="99"} 1' in reg.render()


def test_overflow_counter_hidden_until_used():
    assert "overflow" not in Registry().render()


# --- HTTP ---------------------------------------------------------------------

async def _request(port: int, raw: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(raw)
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("ascii").split("\r\n")
        headers = dict(ln.split(": ", 1) for ln in lines[1:])
        return int(lines[0].split(" ")[1]), headers, body
    return await asyncio.wait_for(go(), timeout)


def _get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


class _Checks:
    def __init__(self):
        self.health = (True, "")
        self.ready = (False, "no workers registered")


async def _started(**kw) -> tuple[MetricsServer, Registry, _Checks]:
    reg = Registry()
    reg.counter("eplbd_up_total", "up").inc()
    checks = _Checks()
    server = MetricsServer(reg, "127.0.0.1", 0, lambda: checks.health, lambda: checks.ready, **kw)
    return server, reg, checks


async def test_http_endpoints():
    server, reg, checks = await _started()
    port = await server.start()
    try:
        assert port > 0
        status, headers, body = await _request(port, _get("/metrics?x=1"))
        assert status == 200 and headers["Content-Type"] == CONTENT_TYPE
        assert body.decode() == reg.render() and int(headers["Content-Length"]) == len(body)

        assert (await _request(port, _get("/healthz")))[::2] == (200, b"ok\n")
        checks.health = (False, "ingest loop stalled")
        assert (await _request(port, _get("/healthz")))[::2] == (503, b"ingest loop stalled\n")

        assert (await _request(port, _get("/readyz")))[::2] == (503, b"no workers registered\n")
        checks.ready = (True, "4 ranks registered")
        assert (await _request(port, _get("/readyz")))[::2] == (200, b"4 ranks registered\n")

        assert (await _request(port, _get("/nope")))[0] == 404
        status, headers, _ = await _request(port, _get("/metrics", "POST"))
        assert status == 405 and headers["Allow"] == "GET, HEAD"
        status, headers, body = await _request(port, _get("/metrics", "HEAD"))
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    finally:
        await server.stop()


async def test_raising_check_is_503():
    reg = Registry()

    def boom():
        raise RuntimeError("state lock poisoned")

    server = MetricsServer(reg, "127.0.0.1", 0, boom, boom)
    port = await server.start()
    try:
        status, _, body = await _request(port, _get("/healthz"))
        assert status == 503 and b"state lock poisoned" in body
    finally:
        await server.stop()


@pytest.mark.parametrize("raw,statuses", [
    (b"\x00\xff\xfe garbage\r\n\r\n", {400}),
    (b"GET /metrics\r\n\r\n", {400}),
    (b"GET /metrics SPDY/9\r\n\r\n", {400}),
    (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 3000 + b"\r\n\r\n", {431}),
    (b"GET /metr", {400}),  # client half-closes mid-request (see below)
])
async def test_garbage_does_not_kill_server(raw, statuses):
    server, _, _ = await _started(max_request_bytes=1024)
    port = await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        writer.write_eof()
        try:
            data = await asyncio.wait_for(reader.read(), 5)
            assert int(data.split(b" ")[1]) in statuses
        except ConnectionResetError:
            pass  # the server may close with unread bytes pending: still a clean refusal
        writer.close()
        assert (await _request(port, _get("/healthz")))[0] == 200
    finally:
        await server.stop()


async def test_slow_client_times_out_and_server_lives():
    server, _, _ = await _started(read_timeout_s=0.2)
    port = await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # never finishes the head
        data = await asyncio.wait_for(reader.read(), 5)
        assert data.startswith(b"HTTP/1.1 408 ")
        writer.close()
        assert (await _request(port, _get("/metrics")))[0] == 200
    finally:
        await server.stop()


async def test_stop_with_idle_connection_open():
    server, _, _ = await _started(read_timeout_s=30)
    port = await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.sleep(0.05)  # let the server accept it
    await asyncio.wait_for(server.stop(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)


def test_under_uvloop():
    async def main():
        server, _, _ = await _started()
        port = await server.start()
        try:
            assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
            assert (await _request(port, _get("/metrics")))[0] == 200
            assert (await _request(port, b"\r\n\r\n"))[0] == 400
            assert (await _request(port, _get("/readyz")))[0] == 503
        finally:
            await server.stop()

    uvloop.run(main())


def test_urllib_client_in_thread():
    import threading
    import urllib.error
    import urllib.request

    async def main():
        server, _, _ = await _started()
        port = await server.start()
        result = {}

        def fetch():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                result["metrics"] = (resp.status, resp.headers["Content-Type"], resp.read())
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5)
            except urllib.error.HTTPError as exc:
                result["readyz"] = (exc.code, exc.read())
                exc.close()

        t = threading.Thread(target=fetch)
        t.start()
        try:
            await asyncio.wait_for(asyncio.to_thread(t.join, 10), 15)
        finally:
            await server.stop()
        return result

    result = asyncio.run(main())
    assert result["metrics"][0] == 200 and result["metrics"][1] == CONTENT_TYPE
    assert b"eplbd_up_total 1" in result["metrics"][2]
    assert result["readyz"] == (503, b"no workers registered\n")
