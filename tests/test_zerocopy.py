"""The zero-copy buffer pool: kbloop.Buffer, ZeroCopyProtocol, zero-copy sends, back-pressure."""
import asyncio
import gc
import io
import hashlib
import os
import socket
import threading

import pytest

import kbloop

KB_MODES = {
    'default': {},
    'busy_poll': {'busy_poll': True, 'spin_us': 20},
    'sqpoll': {'sqpoll': True, 'sq_idle_ms': 10},
}


def kb_loop(**options):
    return kbloop.new_event_loop(backend='io_uring', **options)


def run_on(coro_fn, timeout=120, **options):
    async def guarded():
        return await asyncio.wait_for(coro_fn(), timeout)
    with asyncio.Runner(loop_factory=lambda: kb_loop(**options)) as runner:
        return runner.run(guarded())


class Keeper(kbloop.ZeroCopyProtocol):
    """Keeps every Buffer it is given (or hands it to on_buffer) until told otherwise."""

    def __init__(self, on_buffer=None):
        self.buffers = []
        self.on_buffer = on_buffer
        self.transport = None
        self.eof = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def buffer_received(self, buf):
        if self.on_buffer is not None:
            self.on_buffer(buf)
        else:
            self.buffers.append(buf)

    def eof_received(self):
        self.eof.set_result(None)
        return True

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)


async def serve_one(protocol):
    """A server whose single connection uses `protocol`; returns (server, client socket)."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: protocol, '127.0.0.1', 0)
    client = socket.create_connection(server.sockets[0].getsockname()[:2])
    return server, client


def sender(sock, blocks, close=True):
    """Send blocks from a thread with a blocking socket; returns the thread and a digest box."""
    digest = {}

    def work():
        h = hashlib.sha256()
        n = 0
        for block in blocks:
            sock.sendall(block)
            h.update(block)
            n += len(block)
        if close:
            sock.shutdown(socket.SHUT_WR)
        digest['sha256'] = h.hexdigest()
        digest['bytes'] = n

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, digest


def patterned_blocks(total, block=1 << 20):
    """Distinct blocks (a counter in every 8 bytes would be slow in Python: vary a random block
    by its index instead), so that a reordered or repeated block changes the hash."""
    base = bytearray(os.urandom(block))
    for i in range(total // block):
        base[:8] = i.to_bytes(8, 'little')
        base[-8:] = (~i & 0xFFFFFFFFFFFFFFFF).to_bytes(8, 'little')
        yield bytes(base)


# -- the Buffer object --------------------------------------------------------------------------

def test_buffer_is_writable_memory_that_slices_without_copy():
    loop = kb_loop()
    try:
        start = loop.buffer_pool.stats()
        buf = loop.alloc_buffer(100_000)
        assert isinstance(buf, kbloop.Buffer)
        assert len(buf) == buf.nbytes == 100_000 and not buf.readonly
        view = memoryview(buf)
        view[:5] = b'hello'
        part = buf[1:4]
        assert isinstance(part, kbloop.Buffer) and bytes(part) == b'ell'
        memoryview(part)[0] = ord('E')           # the slice is the same memory
        assert bytes(buf[:5]) == b'hEllo'
        assert buf[0] == ord('h') and buf[::2][:3] == b'hlo'
        assert hashlib.sha256(buf).digest() == hashlib.sha256(bytes(buf)).digest()
        stats = loop.buffer_pool.stats()
        assert stats['in_use_buffers'] == start['in_use_buffers'] + 1
        assert stats['in_use_bytes'] >= 100_000
        with pytest.raises(BufferError):
            buf.release()                        # a memoryview still shows it
        view.release()
        del buf, part
        gc.collect()
        end = loop.buffer_pool.stats()
        assert end['in_use_buffers'] == start['in_use_buffers']
        assert end['in_use_bytes'] == start['in_use_bytes']
        assert end['frees'] == end['allocs']
    finally:
        loop.close()


def test_buffer_bad_input():
    loop = kb_loop(pool_limit_mb=40)      # 32 MiB of it is the receive ring
    try:
        for bad in (0, -1):
            with pytest.raises(ValueError):
                loop.alloc_buffer(bad)
        with pytest.raises(TypeError):
            loop.alloc_buffer('10')
        with pytest.raises(TypeError):
            kbloop.Buffer()
        with pytest.raises(MemoryError, match='limit'):
            loop.alloc_buffer(16 << 20)
        buf = loop.alloc_buffer(10)
        buf.release()
        assert buf.released and len(buf) == 0
        with pytest.raises(ValueError, match='released'):
            memoryview(buf)
        with pytest.raises(ValueError, match='released'):
            buf.tobytes()
        assert loop.buffer_pool.stats()['in_use_buffers'] == 0
        with pytest.raises(ValueError):
            kbloop.new_event_loop(pool_limit_mb=1)
    finally:
        loop.close()
    with pytest.raises(RuntimeError, match='closed'):
        loop.alloc_buffer(10)


def test_large_buffers_get_their_own_mapping_and_give_it_back():
    loop = kb_loop()
    try:
        mapped = loop.buffer_pool.stats()['mapped_bytes']
        buf = loop.alloc_buffer(5 << 20)
        memoryview(buf)[-1] = 7
        assert loop.buffer_pool.stats()['mapped_bytes'] == mapped + (6 << 20)
        del buf
        assert loop.buffer_pool.stats()['mapped_bytes'] == mapped
        assert loop.buffer_pool.stats()['in_use_bytes'] == 0
    finally:
        loop.close()


def test_hugepage_slabs_when_the_system_has_them_reserved():
    path = '/proc/sys/vm/nr_hugepages'
    try:
        with open(path) as f:
            before = int(f.read())
        with open(path, 'w') as f:
            f.write(str(before + 4))
        with open(path) as f:
            got = int(f.read())
    except OSError as exc:
        pytest.skip(f'cannot reserve hugepages here: {exc}')
    try:
        if got < before + 2:
            pytest.skip('the kernel could not reserve 2 MiB hugepages (memory fragmented)')
        loop = kb_loop()
        try:
            buf = loop.alloc_buffer(4096)
            memoryview(buf)[:3] = b'abc'
            assert loop.buffer_pool.stats()['hugepage_slabs'] >= 1
            assert bytes(buf[:3]) == b'abc'
            del buf
        finally:
            loop.close()
        loop = kb_loop(hugepages=False)
        try:
            buf = loop.alloc_buffer(4096)
            assert loop.buffer_pool.stats()['hugepage_slabs'] == 0
            del buf
        finally:
            loop.close()
    finally:
        with open(path, 'w') as f:
            f.write(str(before))


# -- zero-copy receive ----------------------------------------------------------------------

@pytest.mark.parametrize('mode', list(KB_MODES))
def test_kept_buffers_stay_intact_while_the_ring_is_reused(mode):
    """The first buffers are kept; 64 MiB more flows through a 16-buffer ring around them."""
    kept_count = 4
    chunks = []

    async def main():
        loop = asyncio.get_running_loop()
        stream = hashlib.sha256()
        state = {'bytes': 0}

        def on_buffer(buf):
            state['bytes'] += len(buf)
            stream.update(buf)
            if len(chunks) < kept_count:
                chunks.append(buf)              # kept beyond the callback
            # others are dropped here: their ring buffer is reused at once

        proto = Keeper(on_buffer)
        server, client = await serve_one(proto)
        blocks = list(patterned_blocks(64 << 20))
        thread, digest = sender(client, blocks)
        await proto.eof
        thread.join()
        stats = loop.stats()
        assert state['bytes'] == digest['bytes'] == 64 << 20
        assert stream.hexdigest() == digest['sha256']
        assert stats['recv_lends'] > 16 * 4, stats      # the ring went round many times
        assert stats['recv_buffers_lent'] == kept_count
        # the kept buffers still hold the stream's first bytes
        head = b''.join(blocks)[:sum(map(len, chunks))]
        assert b''.join(bytes(c) for c in chunks) == head
        chunks.clear()
        gc.collect()
        stats = loop.stats()
        assert stats['recv_buffers_lent'] == 0 and stats['bufs_out'] == 0
        client.close()
        server.close()

    run_on(main, recv_buffers=16, **KB_MODES[mode])


def test_pool_exhaustion_pauses_and_resumes_with_every_byte_in_order():
    """A slow consumer of 256 MiB: the connection stops receiving while it holds half the
    ring and resumes as buffers come back; the hash of what arrived matches what was sent."""
    total = 256 << 20

    async def main():
        loop = asyncio.get_running_loop()
        held = []
        stream = hashlib.sha256()
        state = {'bytes': 0, 'max_held': 0}
        proto = Keeper(held.append)

        def consume():
            # a slow consumer: every tick, it processes a few of the buffers it holds
            state['max_held'] = max(state['max_held'], len(held))
            for _ in range(min(6, len(held))):
                buf = held.pop(0)
                stream.update(buf)
                state['bytes'] += len(buf)
            if not (proto.eof.done() and not held):
                loop.call_later(0.0005, consume)
            else:
                done.set_result(None)

        done = loop.create_future()
        server, client = await serve_one(proto)
        thread, digest = sender(client, patterned_blocks(total, 4 << 20))
        loop.call_soon(consume)
        await done
        thread.join()
        stats = loop.stats()
        assert state['bytes'] == digest['bytes'] == total
        assert stream.hexdigest() == digest['sha256']
        assert stats['recv_throttles'] > 0, stats       # it did pause ...
        assert state['max_held'] <= 64                  # ... before the ring ran out
        assert stats['recv_buffers_lent'] == 0 and stats['bufs_out'] == 0
        client.close()
        server.close()

    run_on(main, timeout=300, recv_buffers=64)


def test_a_throttled_connection_does_not_starve_the_others():
    async def main():
        loop = asyncio.get_running_loop()
        hog = Keeper()                          # keeps everything, never lets go
        server, hog_client = await serve_one(hog)
        thread, _ = sender(hog_client, [os.urandom(8 << 20)], close=False)
        for _ in range(400):
            await asyncio.sleep(0.005)
            if loop.stats()['recv_throttles']:
                break
        assert loop.stats()['recv_throttles'] == 1
        # it stopped at half the ring: the other half is left for the other connections
        assert len(hog.buffers) == 16
        # a second connection still receives: half the ring is left for the others
        echo = await loop.create_server(lambda: EchoZC(), '127.0.0.1', 0)
        r, w = await asyncio.open_connection(*echo.sockets[0].getsockname()[:2])
        payload = os.urandom(300_000)
        w.write(payload)
        assert await r.readexactly(len(payload)) == payload
        # the hog resumes when it lets go, and gets the rest of its 8 MiB
        received = sum(map(len, hog.buffers))
        hog.on_buffer = lambda buf: hog.buffers.append(len(buf))
        hog.buffers = [received]
        for _ in range(2000):
            await asyncio.sleep(0.005)
            if sum(hog.buffers) == 8 << 20:
                break
        assert sum(hog.buffers) == 8 << 20
        thread.join()
        w.close()
        hog_client.close()
        server.close()
        echo.close()

    run_on(main, recv_buffers=32)


class EchoZC(kbloop.ZeroCopyProtocol):
    """Echoes the received buffers themselves (no copy on either side)."""

    def connection_made(self, transport):
        self.transport = transport

    def buffer_received(self, buf):
        self.transport.write(buf)


@pytest.mark.parametrize('loop_name', ['asyncio', 'kbloop'])
def test_zero_copy_protocol_runs_on_asyncio_too(loop_name):
    factory = asyncio.new_event_loop if loop_name == 'asyncio' else kb_loop

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(EchoZC, '127.0.0.1', 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        payload = os.urandom(1 << 20)
        writer.write(payload)
        assert await reader.readexactly(len(payload)) == payload
        writer.close()
        server.close()
        await server.wait_closed()

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(main(), 60))


def test_pause_reading_keeps_buffers_in_order():
    async def main():
        h = hashlib.sha256()
        got = []

        def on_buffer(buf):
            got.append(len(buf))
            h.update(buf)

        proto = Keeper(on_buffer)
        server, client = await serve_one(proto)
        while proto.transport is None:
            await asyncio.sleep(0.001)
        proto.transport.pause_reading()
        thread, digest = sender(client, patterned_blocks(8 << 20))
        await asyncio.sleep(0.1)
        assert sum(got) < 8 << 20
        proto.transport.resume_reading()
        await proto.eof
        thread.join()
        assert sum(got) == 8 << 20
        assert h.hexdigest() == digest['sha256']
        client.close()
        server.close()

    run_on(main, recv_buffers=64)


def test_a_received_buffer_outlives_its_loop():
    kept = []

    async def main():
        proto = Keeper()
        server, client = await serve_one(proto)
        client.sendall(b'still here after close')
        client.shutdown(socket.SHUT_WR)
        await proto.eof
        kept.extend(proto.buffers)
        client.close()
        server.close()

    run_on(main)
    gc.collect()
    assert b''.join(bytes(b) for b in kept) == b'still here after close'
    assert kept[0][:5].tobytes() == b'still'


def test_buffers_let_go_in_another_thread_wake_the_loop():
    async def main():
        loop = asyncio.get_running_loop()
        proto = Keeper()
        server, client = await serve_one(proto)
        thread, digest = sender(client, patterned_blocks(4 << 20))
        for _ in range(400):
            await asyncio.sleep(0.005)
            if loop.stats()['recv_throttles']:
                break
        assert loop.stats()['recv_throttles']
        taken, proto.buffers = proto.buffers, []
        h = hashlib.sha256()
        for buf in taken:
            h.update(buf)
        proto.on_buffer = h.update          # from now on: hashed and let go at once

        def drop_later():
            # the buffers die in this thread while the loop sleeps in the kernel
            taken.clear()

        await loop.run_in_executor(None, drop_later)
        await proto.eof
        thread.join()
        assert h.hexdigest() == digest['sha256']
        client.close()
        server.close()

    run_on(main, recv_buffers=32)


# -- zero-copy send -------------------------------------------------------------------------

@pytest.mark.parametrize('mode', list(KB_MODES))
def test_zero_copy_send_of_a_pool_buffer(mode):
    async def main():
        loop = asyncio.get_running_loop()
        proto = Keeper()
        server, client = await serve_one(proto)
        while proto.transport is None:
            await asyncio.sleep(0.001)
        payload = os.urandom(1 << 20)
        before = loop.stats()
        buf = loop.alloc_buffer(len(payload))
        memoryview(buf)[:] = payload
        proto.transport.write(b'head')
        proto.transport.write(buf)
        proto.transport.write(b'tail')
        assert buf.readonly
        assert memoryview(buf).readonly       # the kernel may still be reading it
        with pytest.raises(TypeError):
            memoryview(buf)[0] = 0
        with pytest.raises(TypeError, match='read-write'):
            io.BytesIO(b'x').readinto(buf)    # asks for a writable view
        small = loop.alloc_buffer(1000)
        memoryview(small)[:] = payload[:1000]
        proto.transport.write(small)
        got = await loop.run_in_executor(None, recv_exactly, client, len(payload) + 1008)
        assert got == b'head' + payload + b'tail' + payload[:1000]
        after = loop.stats()
        # the registered-memory zero-copy opcode carried the big buffer, from where it was
        assert after['fixed_buffers'] >= 1
        assert after['send_zc'] - before['send_zc'] >= 1
        assert after['send_zc_bytes'] - before['send_zc_bytes'] == len(payload)
        del buf, small
        # the pool gets it back once the kernel's notification arrives
        for _ in range(200):
            gc.collect()
            if loop.buffer_pool.stats()['in_use_buffers'] == 0:
                break
            await asyncio.sleep(0.005)
        assert loop.buffer_pool.stats()['in_use_buffers'] == 0
        client.close()
        server.close()

    run_on(main, **KB_MODES[mode])


def test_pool_buffers_over_unix_sockets_and_echoed_receive_buffers(tmp_path):
    """No SEND_ZC on AF_UNIX: the ordinary gathered send takes the Buffer (still no copy)."""
    async def main():
        loop = asyncio.get_running_loop()
        path = str(tmp_path / 's')
        server = await loop.create_unix_server(EchoZC, path)
        reader, writer = await asyncio.open_unix_connection(path)
        payload = os.urandom(3 << 20)
        writer.write(payload)
        assert await reader.readexactly(len(payload)) == payload
        assert loop.stats()['send_zc'] == 0
        writer.close()
        server.close()

    run_on(main)


def recv_exactly(sock, n):
    sock.settimeout(30)
    parts = []
    while n:
        part = sock.recv(min(n, 1 << 20))
        assert part, 'connection closed early'
        parts.append(part)
        n -= len(part)
    return b''.join(parts)

