"""bench/load.py's pieces that decide its table: what counts as an error, the percentiles."""

import asyncio

from bench import load


def test_an_unexpected_status_or_no_answer_is_an_error_per_endpoint():
    results = [("api me", 200, 0.010)] * 98 + [("api me", 500, 0.5), ("login (write)", 0, 30.0)]
    results += [("login (write)", 302, 0.300)] * 10
    summary = load.summarise(results, seconds=10.0)
    assert summary["requests"] == 110 and summary["throughput"] == 11.0
    assert summary["errors"] == 2
    assert summary["error_kinds"] == {"api me: 500": 1, "login (write): no answer": 1}
    me = summary["endpoints"]["api me"]
    assert me["n"] == 99 and me["p50"] == 10.0 and me["p99"] > 10.0


def test_the_open_loop_measures_from_when_a_request_was_due():
    # a server that answers one request at a time in 50 ms: at 40 requests/s the queue grows,
    # and the latency must show it (a closed loop would report 50 ms for each)
    async def serve():
        lock = asyncio.Lock()

        async def handle(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            async with lock:
                await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, load.HOST, 0)
        port = server.sockets[0].getsockname()[1]
        client = load.Client(port, {"user": ["s"], "staff": ["s"]}, ("c", "t"), users=100)
        load.MIX, saved = (("api me", 1, "user", "GET", "/api/me/"),), load.MIX
        try:
            return await load.open_loop(client, rate=40.0, seconds=1.0)
        finally:
            load.MIX = saved
            server.close()

    summary = asyncio.run(serve())
    assert summary["errors"] == 0 and summary["requests"] == 40
    assert summary["all"]["p99"] > 500  # the last requests waited for the 39 before them
