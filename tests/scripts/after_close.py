"""Use every public method of a transport, server or loop after its loop is closed.

    python after_close.py LOOP GROUP     (LOOP: asyncio | kbloop[-mode]; GROUP: see GROUPS)

Prints one JSON object: method -> the name of the exception it raised, or null.  A crash of
the interpreter is the parent test's failure (exit status < 0); each call is announced on
stderr first so that the parent can say which one crashed.
"""
import asyncio
import json
import os
import socket
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loops import make_loop  # noqa: E402


class Proto(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport


class DProto(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport


def call_all(obj, calls):
    out = {}
    for name, fn in calls:
        print(f'calling {name}', file=sys.stderr, flush=True)
        try:
            fn(obj)
            out[name] = None
        except Exception as exc:   # noqa: BLE001 -- the type is the result
            out[name] = type(exc).__name__
    return out


STREAM_CALLS = [
    ('get_extra_info', lambda t: t.get_extra_info('peername')),
    ('is_closing', lambda t: t.is_closing()),
    ('get_write_buffer_size', lambda t: t.get_write_buffer_size()),
    ('get_write_buffer_limits', lambda t: t.get_write_buffer_limits()),
    ('set_write_buffer_limits', lambda t: t.set_write_buffer_limits(1000)),
    ('is_reading', lambda t: t.is_reading()),
    ('pause_reading', lambda t: t.pause_reading()),
    ('resume_reading', lambda t: t.resume_reading()),
    ('pause_reading_2', lambda t: t.pause_reading()),
    ('get_protocol', lambda t: t.get_protocol()),
    ('set_protocol', lambda t: t.set_protocol(t.get_protocol())),
    ('can_write_eof', lambda t: t.can_write_eof()),
    ('close', lambda t: t.close()),
    ('close_again', lambda t: t.close()),
    ('abort', lambda t: t.abort()),
    ('write_after_close', lambda t: t.write(b'x')),
]


async def tcp_pair(loop, family):
    if family == 'unix':
        path = os.path.join(tempfile.mkdtemp(), 's')
        server = await loop.create_unix_server(Proto, path)
        _, proto = await loop.create_unix_connection(Proto, path)
    else:
        server = await loop.create_server(Proto, '127.0.0.1', 0)
        port = server.sockets[0].getsockname()[1]
        _, proto = await loop.create_connection(Proto, '127.0.0.1', port)
    await asyncio.sleep(0.05)
    return server, proto.transport


def stream_calls(t, server, abort_first=False):
    """Every stream transport method, then the server's (also used on the DPDK datapath)."""
    calls = STREAM_CALLS
    if abort_first:
        calls = [('abort', lambda t: t.abort())] + [c for c in STREAM_CALLS if c[0] != 'abort']
    out = call_all(t, calls)
    out.update(call_all(t, [('write', lambda t: t.write(b'data')),
                            ('writelines', lambda t: t.writelines([b'a', b'b'])),
                            ('write_eof', lambda t: t.write_eof())]))
    out.update(call_all(server, SERVER_CALLS))
    return out


def group_stream(family, abort_first=False):
    def run(loop):
        server, t = loop.run_until_complete(tcp_pair(loop, family))
        loop.close()
        return stream_calls(t, server, abort_first)
    return run


SERVER_CALLS = [
    ('server.get_loop', lambda s: s.get_loop()),
    ('server.is_serving', lambda s: s.is_serving()),
    ('server.sockets', lambda s: s.sockets),
    ('server.close', lambda s: s.close()),
    ('server.close_again', lambda s: s.close()),
] + ([('server.close_clients', lambda s: s.close_clients()),
      ('server.abort_clients', lambda s: s.abort_clients())]
     if sys.version_info >= (3, 13) else [])


def group_udp(loop):
    async def make():
        t, _ = await loop.create_datagram_endpoint(DProto, local_addr=('127.0.0.1', 0))
        t2, _ = await loop.create_datagram_endpoint(
            DProto, remote_addr=t.get_extra_info('sockname'))
        return t, t2
    t, t2 = loop.run_until_complete(make())
    addr = t.get_extra_info('sockname')
    loop.close()
    return udp_calls(t, t2, addr)


def udp_calls(t, t2, addr):
    """t: an unconnected endpoint, t2 a connected one (also used on the DPDK datapath)."""
    out = call_all(t, [
        ('get_extra_info', lambda t: t.get_extra_info('sockname')),
        ('is_closing', lambda t: t.is_closing()),
        ('get_write_buffer_size', lambda t: t.get_write_buffer_size()),
        ('sendto', lambda t: t.sendto(b'x', addr)),
        ('close', lambda t: t.close()),
        ('abort', lambda t: t.abort()),
    ])
    out.update(call_all(t2, [('connected.abort', lambda t: t.abort()),
                             ('connected.close', lambda t: t.close())]))
    return out


def group_server(loop):
    async def make():
        server = await loop.create_server(Proto, '127.0.0.1', 0)
        port = server.sockets[0].getsockname()[1]
        await loop.create_connection(Proto, '127.0.0.1', port)
        await asyncio.sleep(0.05)
        return server
    server = loop.run_until_complete(make())
    loop.close()
    return call_all(server, SERVER_CALLS)


def group_loop(loop):
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    listening = socket.socket()
    listening.bind(('127.0.0.1', 0))
    listening.listen()
    listening.setblocking(False)
    loop.close()
    calls = [
        ('time', lambda l: l.time()),
        ('is_closed', lambda l: l.is_closed()),
        ('is_running', lambda l: l.is_running()),
        ('get_debug', lambda l: l.get_debug()),
        ('set_debug', lambda l: l.set_debug(False)),
        ('stop', lambda l: l.stop()),
        ('close', lambda l: l.close()),
        ('call_soon', lambda l: l.call_soon(print)),
        ('call_later', lambda l: l.call_later(1, print)),
        ('call_at', lambda l: l.call_at(l.time() + 1, print)),
        ('call_soon_threadsafe', lambda l: l.call_soon_threadsafe(print)),
        ('create_future', lambda l: l.create_future()),
        ('run_forever', lambda l: l.run_forever()),
        ('run_until_complete', lambda l: l.run_until_complete(asyncio.sleep(0))),
        ('add_reader', lambda l: l.add_reader(r, print)),
        ('remove_reader', lambda l: l.remove_reader(r)),
        ('add_writer', lambda l: l.add_writer(w, print)),
        ('remove_writer', lambda l: l.remove_writer(w)),
        ('run_in_executor', lambda l: l.run_in_executor(None, print)),
        ('set_default_executor', lambda l: l.set_default_executor(None)),
        ('get_exception_handler', lambda l: l.get_exception_handler()),
        ('call_exception_handler', lambda l: l.call_exception_handler({'message': 'x'})),
        ('remove_signal_handler', lambda l: l.remove_signal_handler(10)),
        ('add_signal_handler', lambda l: l.add_signal_handler(10, print)),
    ]
    out = call_all(loop, calls)
    for name in ('sock_recv', 'sock_sendall', 'sock_accept', 'sock_connect',
                 'create_connection', 'create_server', 'getaddrinfo',
                 'shutdown_asyncgens', 'shutdown_default_executor'):
        coro = {
            'sock_recv': lambda: loop.sock_recv(r, 10),
            'sock_sendall': lambda: loop.sock_sendall(w, b'x'),
            'sock_accept': lambda: loop.sock_accept(listening),
            'sock_connect': lambda: loop.sock_connect(r, ('127.0.0.1', 1)),
            'create_connection': lambda: loop.create_connection(Proto, '127.0.0.1', 1),
            'create_server': lambda: loop.create_server(Proto, '127.0.0.1', 0),
            'getaddrinfo': lambda: loop.getaddrinfo('localhost', 80),
            'shutdown_asyncgens': lambda: loop.shutdown_asyncgens(),
            'shutdown_default_executor': lambda: loop.shutdown_default_executor(),
        }[name]
        print(f'calling {name}', file=sys.stderr, flush=True)
        try:
            c = coro()
            c.send(None)    # the first step of the coroutine, as a task's would be
            out[name] = None
        except StopIteration:
            out[name] = None
        except Exception as exc:   # noqa: BLE001
            out[name] = type(exc).__name__
        finally:
            try:
                c.close()
            except Exception:   # noqa: BLE001
                pass
    return out


def group_pipes(loop):
    async def make():
        r, w = os.pipe()
        rt, _ = await loop.connect_read_pipe(Proto, os.fdopen(r, 'rb', 0))
        wt, _ = await loop.connect_write_pipe(Proto, os.fdopen(w, 'wb', 0))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, '-c', 'import sys; sys.stdin.read()',
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        return rt, wt, proc
    rt, wt, proc = loop.run_until_complete(make())
    loop.close()
    out = call_all(rt, [('read_pipe.pause_reading', lambda t: t.pause_reading()),
                        ('read_pipe.resume_reading', lambda t: t.resume_reading()),
                        ('read_pipe.close', lambda t: t.close())])
    out.update(call_all(wt, [('write_pipe.write', lambda t: t.write(b'x')),
                             ('write_pipe.abort', lambda t: t.abort())]))
    out.update(call_all(proc, [('proc.stdin.write', lambda p: p.stdin.write(b'x')),
                               ('proc.kill', lambda p: p.kill()),
                               ('proc.transport.close', lambda p: p._transport.close())]))
    return out


def group_buffers(loop):
    if not hasattr(loop, 'alloc_buffer'):
        return {}
    buf = loop.alloc_buffer(4096)
    memoryview(buf)[:4] = b'abcd'
    loop.close()
    out = call_all(buf, [('buffer.bytes', lambda b: bytes(b[:4])),
                         ('buffer.release', lambda b: b.release())])
    out.update(call_all(loop, [('alloc_buffer', lambda l: l.alloc_buffer(10)),
                               ('stats', lambda l: l.stats())]))
    return out


GROUPS = {
    'tcp': group_stream('tcp'),
    'tcp_abort_first': group_stream('tcp', abort_first=True),
    'unix': group_stream('unix'),
    'udp': group_udp,
    'server': group_server,
    'loop': group_loop,
    'pipes': group_pipes,
    'buffers': group_buffers,
}

if __name__ == '__main__':
    import warnings
    warnings.simplefilter('ignore')
    loop = make_loop(sys.argv[1])
    print(json.dumps(GROUPS[sys.argv[2]](loop)))
