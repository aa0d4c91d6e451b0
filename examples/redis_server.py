"""A small Redis-compatible in-memory server on asyncio.Protocol.

Speaks RESP2 only (arrays of bulk strings, as clients send; no HELLO/RESP3)
and inline commands (``PING\\r\\n``, as ``redis-benchmark`` and telnet send).  Commands: PING,
ECHO, SET, GET, DEL, EXISTS, INCR, DECR, INCRBY, DBSIZE, FLUSHALL, QUIT, and
just enough of CONFIG GET / CLIENT / COMMAND for ``redis-benchmark``,
``redis-cli`` and redis-py to connect.  Pipelining: every complete command in
the receive buffer is executed and all replies go out in one write.

Loop-agnostic like the other examples:

    python examples/redis_server.py --port 0            # asyncio
    python -m kbloop examples/redis_server.py --port 0  # kbloop
    redis-benchmark -p PORT -t ping,set,get,incr -P 16 -q

Prints ``listening on HOST:PORT`` once accepting; exits 0 on SIGTERM/SIGINT.
"""

import argparse
import asyncio
import signal
import sys

OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
NIL = b"$-1\r\n"
NOT_INT = b"-ERR value is not an integer or out of range\r\n"
# What redis-benchmark asks for at start-up (CONFIG GET save / appendonly).
CONFIG = {b"save": b"", b"appendonly": b"no"}


class ProtocolError(Exception):
    pass


def bulk(value):
    return b"$%d\r\n%b\r\n" % (len(value), value)


def integer(n):
    return b":%d\r\n" % n


def array(items):
    return b"*%d\r\n" % len(items) + b"".join(bulk(x) for x in items)


def error(text):
    return b"-ERR %s\r\n" % text.encode()


def parse_command(buf, pos):
    """Parse one command at buf[pos:].

    Returns (args, next_pos), or (None, pos) if the command is not complete yet.
    """
    if buf[pos] != 0x2A:  # not '*': an inline command, one line of words
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None, pos
        return bytes(buf[pos:end]).split(), end + 2
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None, pos
    try:
        count = int(buf[pos + 1:end])
    except ValueError:
        raise ProtocolError("invalid multibulk length") from None
    pos = end + 2
    args = []
    for _ in range(count):
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None, pos
        if buf[pos] != 0x24:  # '$'
            raise ProtocolError(f"expected '$', got {chr(buf[pos])!r}")
        try:
            size = int(buf[pos + 1:end])
        except ValueError:
            raise ProtocolError("invalid bulk length") from None
        start = end + 2
        if len(buf) < start + size + 2:
            return None, pos
        args.append(bytes(buf[start:start + size]))
        pos = start + size + 2
    return args, pos


class RedisProtocol(asyncio.Protocol):
    def __init__(self, db):
        self.db = db
        self.buf = bytearray()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        buf, pos, replies = self.buf, 0, []
        try:
            while pos < len(buf):
                args, new_pos = parse_command(buf, pos)
                if args is None:
                    break
                pos = new_pos
                if not args:
                    continue
                if args[0].upper() == b"QUIT":
                    self.transport.write(b"".join(replies) + OK)
                    self.transport.close()
                    return
                replies.append(self.execute(args))
        except ProtocolError as e:
            replies.append(b"-ERR Protocol error: %s\r\n" % str(e).encode())
            self.transport.write(b"".join(replies))
            self.transport.close()
            return
        del buf[:pos]
        if replies:
            self.transport.write(b"".join(replies))

    def execute(self, args):
        name = args[0].upper()
        handler = COMMANDS.get(name)
        if handler is None:
            return error(f"unknown command '{args[0].decode(errors='replace')}'")
        arity = ARITY[name]
        if (len(args) != arity) if arity > 0 else (len(args) < -arity):
            return error(f"wrong number of arguments for '{name.decode().lower()}' command")
        return handler(self.db, args)


def cmd_incrby(db, key, by):
    try:
        value = int(db.get(key, b"0")) + by
    except ValueError:
        return NOT_INT
    db[key] = b"%d" % value
    return integer(value)


def cmd_incr_by_arg(db, args):
    try:
        by = int(args[2])
    except ValueError:
        return NOT_INT
    return cmd_incrby(db, args[1], by)


def cmd_set(db, args):
    # Options (EX, PX, NX, ...) are not supported: say so rather than ignore them.
    if len(args) != 3:
        return error("syntax error")
    db[args[1]] = args[2]
    return OK


def cmd_get(db, args):
    value = db.get(args[1])
    return NIL if value is None else bulk(value)


def cmd_config(db, args):
    if args[1].upper() == b"GET" and len(args) == 3:
        key = args[2].lower()
        return array([key, CONFIG[key]]) if key in CONFIG else b"*0\r\n"
    return error("only CONFIG GET is supported")


# name: (handler, arity as in COMMAND INFO: exact count, or -N for "at least N")
_TABLE = {
    b"PING": (lambda db, a: PONG if len(a) == 1 else bulk(a[1]), -1),
    b"ECHO": (lambda db, a: bulk(a[1]), 2),
    b"SET": (cmd_set, -3),
    b"GET": (cmd_get, 2),
    b"DEL": (lambda db, a: integer(sum(db.pop(k, None) is not None for k in a[1:])), -2),
    b"EXISTS": (lambda db, a: integer(sum(k in db for k in a[1:])), -2),
    b"INCR": (lambda db, a: cmd_incrby(db, a[1], 1), 2),
    b"DECR": (lambda db, a: cmd_incrby(db, a[1], -1), 2),
    b"INCRBY": (cmd_incr_by_arg, 3),
    b"DBSIZE": (lambda db, a: integer(len(db)), 1),
    b"FLUSHALL": (lambda db, a: db.clear() or OK, -1),
    b"FLUSHDB": (lambda db, a: db.clear() or OK, -1),
    b"CONFIG": (cmd_config, -2),
    b"CLIENT": (lambda db, a: OK, -2),   # CLIENT SETINFO / SETNAME from redis-py
    b"COMMAND": (lambda db, a: b"*0\r\n", -1),  # redis-cli asks at start-up
}
COMMANDS = {name: handler for name, (handler, _) in _TABLE.items()}
ARITY = {name: arity for name, (_, arity) in _TABLE.items()}


async def serve(host="127.0.0.1", port=0):
    loop = asyncio.get_running_loop()
    db = {}
    server = await loop.create_server(lambda: RedisProtocol(db), host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    host, port = server.sockets[0].getsockname()[:2]
    cls = type(loop)  # on stderr: lets the benchmark check which loop runs
    print(f"event loop: {cls.__module__}.{cls.__qualname__}", file=sys.stderr, flush=True)
    print(f"listening on {host}:{port}", flush=True)
    async with server:
        await stop.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port")
    args = p.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
