"""create_connection with several addresses (happy eyeballs, interleave, local_addr,
all_errors) and create_server(keep_alive=...).

'localhost' resolves to one address on these machines, so where a test needs a name with
several addresses it gives the loop's resolver a fixed answer of real loopback addresses; the
connection attempts themselves are real."""
import asyncio
import socket

import pytest

LOCAL = "127.0.0.1"


def _closed_port(family=socket.AF_INET, host=LOCAL):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _resolve_to(loop, addresses):
    async def getaddrinfo(host, port, *, family=0, type=0, proto=0, flags=0):
        return [(fam, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (addr, p))
                for fam, addr, p in addresses]
    loop.getaddrinfo = getaddrinfo


@pytest.mark.parametrize("happy_eyeballs_delay,interleave", [
    (None, None), (0.05, None), (0.05, 2), (None, 1)])
def test_second_address_is_used_when_first_refuses(run, happy_eyeballs_delay, interleave):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(asyncio.Protocol, "::1", 0)
        good = server.sockets[0].getsockname()[1]
        _resolve_to(loop, [(socket.AF_INET, LOCAL, _closed_port()),
                           (socket.AF_INET6, "::1", good)])
        try:
            t, _ = await loop.create_connection(
                asyncio.Protocol, "multi.test", 0, happy_eyeballs_delay=happy_eyeballs_delay,
                interleave=interleave)
            peer = t.get_extra_info("peername")
            t.close()
            return peer[:2]
        finally:
            server.close()

    assert run(main)[0] == "::1"


def test_all_addresses_refused_raises_one_oserror(run):
    async def main():
        loop = asyncio.get_running_loop()
        _resolve_to(loop, [(socket.AF_INET, LOCAL, _closed_port()),
                           (socket.AF_INET6, "::1", _closed_port(socket.AF_INET6, "::1"))])
        with pytest.raises(OSError) as info:
            await loop.create_connection(asyncio.Protocol, "multi.test", 0)
        return str(info.value)

    assert "Multiple exceptions" in run(main)


def test_local_addr_is_used(run):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(asyncio.Protocol, LOCAL, 0)
        port = server.sockets[0].getsockname()[1]
        local_port = _closed_port()
        try:
            t, _ = await loop.create_connection(asyncio.Protocol, LOCAL, port,
                                                local_addr=(LOCAL, local_port))
            name = t.get_extra_info("sockname")
            t.close()
            return name, local_port
        finally:
            server.close()

    name, local_port = run(main)
    assert name == (LOCAL, local_port)


def test_kbloop_all_errors_raises_exception_group(kb_run):
    async def main():
        loop = asyncio.get_running_loop()
        _resolve_to(loop, [(socket.AF_INET, LOCAL, _closed_port()),
                           (socket.AF_INET6, "::1", _closed_port(socket.AF_INET6, "::1"))])
        with pytest.raises(ExceptionGroup) as group:
            await loop.create_connection(asyncio.Protocol, "multi.test", 0, all_errors=True)
        with pytest.raises(ExceptionGroup) as single:
            await loop.create_connection(asyncio.Protocol, LOCAL, _closed_port(),
                                         all_errors=True)
        return group.value.exceptions, single.value.exceptions

    many, one = kb_run(main)
    assert len(many) == 2 and all(isinstance(e, ConnectionRefusedError) for e in many)
    assert len(one) == 1 and isinstance(one[0], ConnectionRefusedError)


def test_kbloop_keep_alive_on_accepted_sockets(kb_run):
    async def main():
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()

        class P(asyncio.Protocol):
            def connection_made(self, t):
                accepted.set_result(t.get_extra_info("socket"))

        for keep_alive in (True, False):
            accepted = loop.create_future()
            server = await loop.create_server(P, LOCAL, 0, keep_alive=keep_alive)
            port = server.sockets[0].getsockname()[1]
            r, w = await asyncio.open_connection(LOCAL, port)
            sock = await accepted
            value = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            assert bool(value) is keep_alive
            w.close()
            server.close()

    kb_run(main)


def test_kbloop_datapath_chosen_per_call(kb_run):
    """create_server/create_connection(datapath=...): "kernel" is accepted on every kbloop
    loop; a stack this loop does not have is a ValueError that names the choices (the RDMA and
    DPDK tests force their stacks and the kernel on their own addresses)."""
    async def main():
        server = await asyncio.start_server(lambda r, w: w.close(), LOCAL, 0,
                                            datapath="kernel")
        port = server.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection(LOCAL, port, datapath="kernel")
        assert await r.read() == b""
        w.close()
        for bad in ("rdma", "dpdk", "tcp"):
            with pytest.raises(ValueError, match=r"\['kernel'\]"):
                await asyncio.open_connection(LOCAL, port, datapath=bad)
            with pytest.raises(ValueError, match=r"\['kernel'\]"):
                await asyncio.start_server(lambda r, w: None, LOCAL, 0, datapath=bad)
        server.close()
        await server.wait_closed()

    kb_run(main)
