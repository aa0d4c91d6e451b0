"""connect_read_pipe / connect_write_pipe over pipes, FIFOs, ptys and socketpairs.

Parity tests (asyncio is the control): the same assertions hold on both loops.
"""
import asyncio
import errno
import os
import socket
import tty

import pytest

from netutil import Recorder


class WriteRecorder(asyncio.BaseProtocol):
    def __init__(self):
        loop = asyncio.get_running_loop()
        self.transport = None
        self.lost = loop.create_future()
        self.pause_calls = 0
        self.resume_calls = 0
        self.paused = loop.create_future()
        self.resumed = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.lost.set_result(exc)

    def pause_writing(self):
        self.pause_calls += 1
        if not self.paused.done():
            self.paused.set_result(None)

    def resume_writing(self):
        self.resume_calls += 1
        if not self.resumed.done():
            self.resumed.set_result(None)


def assert_reading(rt, expected):
    """rt.is_reading(), as the loop's pipe transport has it: asyncio's read pipe got it in a
    3.11 bug-fix release (Debian 12's 3.11.2 has only the base class's NotImplementedError)."""
    if type(rt).is_reading is asyncio.ReadTransport.is_reading:
        with pytest.raises(NotImplementedError):
            rt.is_reading()
    else:
        assert rt.is_reading() is expected


async def _connect(rfile, wfile):
    loop = asyncio.get_running_loop()
    rt, rp = await loop.connect_read_pipe(Recorder, rfile)
    wt, wp = await loop.connect_write_pipe(WriteRecorder, wfile)
    return rt, rp, wt, wp


async def _round_trip(rfile, wfile, payload=b"hello pipe" * 1000):
    rt, rp, wt, wp = await _connect(rfile, wfile)
    assert rp.transport is rt and wp.transport is wt
    assert rt.get_extra_info("pipe") is rfile
    assert wt.get_extra_info("pipe") is wfile
    assert_reading(rt, True)
    assert not rt.is_closing()
    assert wt.can_write_eof()
    wt.write(payload[:10])
    wt.write(bytearray(payload[10:20]))
    wt.write(memoryview(payload)[20:])
    wt.write_eof()
    assert wt.is_closing()
    wt.write(b"dropped after write_eof")   # ignored, as asyncio does
    assert await asyncio.wait_for(wp.lost, 10) is None
    assert await asyncio.wait_for(rp.wait_eof(), 10) == payload
    assert await asyncio.wait_for(rp.lost, 10) is None
    assert rt.is_closing()
    return rt, wt


def test_os_pipe_round_trip(run, no_fd_leak):
    async def main():
        r, w = os.pipe()
        await _round_trip(open(r, "rb", buffering=0), open(w, "wb", buffering=0))

    run(main)


def test_fifo_round_trip(run, tmp_path, no_fd_leak):
    async def main():
        path = tmp_path / "fifo"
        os.mkfifo(path)
        r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        w = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        await _round_trip(open(r, "rb", buffering=0), open(w, "wb", buffering=0))

    run(main)


def test_socketpair_round_trip(run, no_fd_leak):
    async def main():
        a, b = socket.socketpair()
        await _round_trip(a, b)

    run(main)


def test_pty_round_trip(run, no_fd_leak):
    async def main():
        master, slave = os.openpty()
        tty.setraw(slave)   # no echo, no newline translation
        rfile = open(master, "rb", buffering=0)
        wfile = open(slave, "wb", buffering=0)
        rt, rp, wt, wp = await _connect(rfile, wfile)
        payload = b"through the pty " * 64
        wt.write(payload)
        assert await asyncio.wait_for(rp.wait_bytes(len(payload)), 10) == payload
        # closing the slave: reading the master fails with EIO, which ends the transport
        wt.close()
        assert await asyncio.wait_for(wp.lost, 10) is None
        exc = await asyncio.wait_for(rp.lost, 10)
        assert exc is None or (isinstance(exc, OSError) and exc.errno == errno.EIO)
        assert not rp.eof.done()

    run(main)


def test_read_pipe_requires_pipe_socket_or_char_device(run, tmp_path, no_fd_leak):
    async def main():
        loop = asyncio.get_running_loop()
        f = open(tmp_path / "regular", "wb+")
        try:
            with pytest.raises(ValueError, match="Pipe transport is"):
                await loop.connect_read_pipe(Recorder, f)
            with pytest.raises(ValueError, match="Pipe transport is"):
                await loop.connect_write_pipe(WriteRecorder, f)
        finally:
            f.close()

    run(main)


def test_write_flow_control_and_pause_reading(run, no_fd_leak):
    async def main():
        r, w = os.pipe()
        rt, rp, wt, wp = await _connect(open(r, "rb", buffering=0), open(w, "wb", buffering=0))
        rt.pause_reading()
        assert_reading(rt, False)
        rt.pause_reading()                     # idempotent
        wt.set_write_buffer_limits(high=64 * 1024, low=16 * 1024)
        assert wt.get_write_buffer_limits() == (16 * 1024, 64 * 1024)
        chunk = bytes(range(256)) * 256        # 64 KiB
        total = 0
        for _ in range(32):                    # 2 MiB: far more than the pipe holds
            wt.write(chunk)
            total += len(chunk)
        await asyncio.wait_for(wp.paused, 10)
        assert wp.pause_calls == 1
        assert wt.get_write_buffer_size() > 0
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(rp.data) == 0               # paused: nothing delivered
        rt.resume_reading()
        assert_reading(rt, True)
        await asyncio.wait_for(wp.resumed, 10)
        data = await asyncio.wait_for(rp.wait_bytes(total), 30)
        assert data == chunk * 32
        assert wt.get_write_buffer_size() == 0
        assert wp.resume_calls == 1
        wt.close()
        await asyncio.wait_for(rp.wait_eof(), 10)
        await asyncio.wait_for(rp.lost, 10)
        assert await asyncio.wait_for(wp.lost, 10) is None

    run(main)


def test_read_pipe_close_without_eof(run, no_fd_leak):
    async def main():
        r, w = os.pipe()
        loop = asyncio.get_running_loop()
        rt, rp = await loop.connect_read_pipe(Recorder, open(r, "rb", buffering=0))
        os.write(w, b"abc")
        assert await asyncio.wait_for(rp.wait_bytes(3), 10) == b"abc"
        rt.close()
        assert rt.is_closing()
        assert_reading(rt, False)
        rt.close()                             # idempotent
        assert await asyncio.wait_for(rp.lost, 10) is None
        assert not rp.eof.done()
        os.close(w)

    run(main)


def test_write_pipe_reader_closes(run, no_fd_leak):
    async def main():
        r, w = os.pipe()
        loop = asyncio.get_running_loop()
        wt, wp = await loop.connect_write_pipe(WriteRecorder, open(w, "wb", buffering=0))
        wt.write(b"x" * 100)
        os.close(r)
        # the reader trick: the write end polls readable (POLLERR) once the reader is gone
        assert await asyncio.wait_for(wp.lost, 10) is None
        assert wt.is_closing()
        wt.write(b"ignored")

    run(main)


def test_write_pipe_reader_closes_with_data_buffered(run, no_fd_leak):
    async def main():
        r, w = os.pipe()
        loop = asyncio.get_running_loop()
        wt, wp = await loop.connect_write_pipe(WriteRecorder, open(w, "wb", buffering=0))
        wt.write(b"x" * (4 << 20))              # more than the pipe holds: buffered
        assert wt.get_write_buffer_size() > 0
        os.close(r)
        exc = await asyncio.wait_for(wp.lost, 10)
        assert isinstance(exc, BrokenPipeError)
        assert wt.get_write_buffer_size() == 0

    run(main)


def test_write_pipe_abort_drops_the_buffer(run, no_fd_leak):
    async def main():
        r, w = os.pipe()
        loop = asyncio.get_running_loop()
        wt, wp = await loop.connect_write_pipe(WriteRecorder, open(w, "wb", buffering=0))
        wt.write(b"y" * (1 << 20))
        assert wt.get_write_buffer_size() > 0
        wt.abort()
        assert wt.get_write_buffer_size() == 0
        assert await asyncio.wait_for(wp.lost, 10) is None
        os.close(r)

    run(main)


def test_write_eof_waits_for_the_buffer(run, no_fd_leak):
    async def main():
        a, b = socket.socketpair()
        rt, rp, wt, wp = await _connect(a, b)
        payload = os.urandom(3 << 20)
        wt.write(payload)
        wt.write_eof()                          # the buffer is flushed first
        assert wt.is_closing()
        assert await asyncio.wait_for(rp.wait_eof(), 30) == payload
        assert await asyncio.wait_for(wp.lost, 10) is None
        assert await asyncio.wait_for(rp.lost, 10) is None

    run(main)


def test_streams_over_pipes(run, no_fd_leak):
    async def main():
        loop = asyncio.get_running_loop()
        r, w = os.pipe()
        reader = asyncio.StreamReader()
        rt, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), open(r, "rb", buffering=0))
        wt, wproto = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, open(w, "wb", buffering=0))
        writer = asyncio.StreamWriter(wt, wproto, None, loop)
        lines = [f"line {i}\n".encode() for i in range(1000)]
        writer.writelines(lines)
        await writer.drain()
        writer.close()
        got = [await reader.readline() for _ in lines]
        assert got == lines
        assert await reader.read() == b""
        assert wt.is_closing() and rt.is_closing()
        for _ in range(3):
            await asyncio.sleep(0)     # connection_lost on both sides closes the pipes

    run(main)
