"""Run each asyncio API that uvloop is known to lack against uvloop (and, for comparison,
asyncio and kbloop), and print what happens.  Source of docs/compatibility.md's uvloop column.

    python scripts/probe_uvloop_gaps.py
"""
import asyncio
import socket
import tempfile

import uvloop

import kbloop


async def probe(name, make):
    try:
        await asyncio.wait_for(make(), 1)
        result = "ok"
    except asyncio.TimeoutError:
        result = "ok (waiting)"
    except BaseException as exc:   # noqa: B902 - we report whatever it is
        result = f"{type(exc).__name__} {str(exc)[:60]}".strip()
    print(f"  {name:42} {result}")


async def main():
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    t, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    dt, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                local_addr=("127.0.0.1", 0))
    print(f"  {'Transport is asyncio.Transport':42} {isinstance(t, asyncio.Transport)}")
    print(f"  {'DatagramTransport is asyncio.DatagramTransport':42} "
          f"{isinstance(dt, asyncio.DatagramTransport)}")
    print(f"  {'get_extra_info(socket) type':42} {type(t.get_extra_info('socket')).__name__}")
    print(f"  {'Server.close_clients exists':42} {hasattr(srv, 'close_clients')}")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.bind(("127.0.0.1", 0))
    await probe("sock_sendto", lambda: loop.sock_sendto(s, b"x", s.getsockname()))
    await probe("sock_recvfrom", lambda: loop.sock_recvfrom(s, 10))
    await probe("sock_recvfrom_into", lambda: loop.sock_recvfrom_into(s, bytearray(10)))
    with tempfile.TemporaryFile() as f:
        f.write(b"x" * 100)
        f.seek(0)
        await probe("sendfile(fallback=False)", lambda: loop.sendfile(t, f, fallback=False))
        f.seek(0)
        await probe("sock_sendfile(fallback=False)", lambda: loop.sock_sendfile(
            t.get_extra_info("socket"), f, fallback=False))
    for kw in ({"happy_eyeballs_delay": 0.1}, {"interleave": 1}, {"all_errors": True}):
        await probe(f"create_connection({next(iter(kw))}=)",
                    lambda: loop.create_connection(asyncio.Protocol, "127.0.0.1", port, **kw))
    await probe("create_server(keep_alive=True)",
                lambda: loop.create_server(asyncio.Protocol, "127.0.0.1", 0, keep_alive=True))
    s.close()


for name, factory in [("asyncio", asyncio.new_event_loop), ("uvloop", uvloop.new_event_loop),
                      ("kbloop", kbloop.new_event_loop)]:
    print(name)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
