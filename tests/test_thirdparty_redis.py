"""redis-py's asyncio client (``redis.asyncio``, unchanged) on the loop under test against a real
``redis-server`` that this module starts on a free loopback port (no persistence, temp dir) and
stops at the end. asyncio is the control; identical assertions."""
import asyncio
import uuid

import pytest

redis_asyncio = pytest.importorskip("redis.asyncio")

from services import RedisServer  # noqa: E402


@pytest.fixture(scope="session")
def redis_server():
    if RedisServer.BINARY is None:
        pytest.skip("redis-server binary not installed (scripts/setup.sh installs it)")
    srv = RedisServer()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def prefix(loop_name):
    """Keys unique to this test run (the server is shared by the module)."""
    return f"kbt:{loop_name}:{uuid.uuid4().hex[:8]}:"


def client(srv, **kw):
    return redis_asyncio.Redis(host=srv.host, port=srv.port, **kw)


def test_set_get_incr(run, redis_server, prefix):
    async def main():
        r = client(redis_server, decode_responses=True)
        try:
            assert await r.ping() is True
            await r.set(prefix + "s", "hello")
            got = await r.get(prefix + "s")
            missing = await r.get(prefix + "nope")
            counts = [await r.incr(prefix + "n") for _ in range(10)]
            by = await r.incrby(prefix + "n", 100)
            await r.set(prefix + "ttl", "x", px=150)
            ttl_before = await r.exists(prefix + "ttl")
            await asyncio.sleep(0.3)
            ttl_after = await r.exists(prefix + "ttl")
            await r.hset(prefix + "h", mapping={"a": "1", "b": "2"})
            h = await r.hgetall(prefix + "h")
            big = "x" * (1024 * 1024)
            await r.set(prefix + "big", big)
            big_back = await r.get(prefix + "big")
            return got, missing, counts, by, ttl_before, ttl_after, h, big_back == big
        finally:
            await r.aclose()

    got, missing, counts, by, ttl_before, ttl_after, h, big_ok = run(main)
    assert got == "hello"
    assert missing is None
    assert counts == list(range(1, 11))
    assert by == 110
    assert (ttl_before, ttl_after) == (1, 0)
    assert h == {"a": "1", "b": "2"}
    assert big_ok


def test_pipelines(run, redis_server, prefix):
    async def main():
        r = client(redis_server)
        try:
            # transactional (MULTI/EXEC)
            async with r.pipeline(transaction=True) as p:
                p.set(prefix + "a", 1).incr(prefix + "a").incr(prefix + "a").get(prefix + "a")
                tx = await p.execute()
            # plain pipeline, many commands in one round trip
            async with r.pipeline(transaction=False) as p:
                for i in range(500):
                    p.rpush(prefix + "l", i)
                p.llen(prefix + "l")
                p.lrange(prefix + "l", 0, 4)
                plain = await p.execute()
            # optimistic locking with WATCH: a concurrent change aborts the transaction
            other = client(redis_server)
            try:
                await r.set(prefix + "w", 1)
                async with r.pipeline(transaction=True) as p:
                    await p.watch(prefix + "w")
                    await other.set(prefix + "w", 2)
                    p.multi()
                    p.set(prefix + "w", 3)
                    with pytest.raises(redis_asyncio.WatchError):
                        await p.execute()
                watched = await r.get(prefix + "w")
            finally:
                await other.aclose()
            return tx, plain[-2:], plain[:3], watched
        finally:
            await r.aclose()

    tx, tail, head, watched = run(main)
    assert tx == [True, 2, 3, b"3"]
    assert tail == [500, [b"0", b"1", b"2", b"3", b"4"]]
    assert head == [1, 2, 3]
    assert watched == b"2"


def test_pubsub(run, redis_server, prefix):
    async def main():
        sub = client(redis_server)
        pub = client(redis_server)
        ps = sub.pubsub()
        try:
            await ps.subscribe(prefix + "ch")
            await ps.psubscribe(prefix + "pat.*")
            confirmations = []
            while len(confirmations) < 2:
                m = await ps.get_message(timeout=5)
                if m is not None:
                    confirmations.append(m["type"])
            receivers = [await pub.publish(prefix + "ch", f"m{i}") for i in range(20)]
            await pub.publish(prefix + "pat.x", "patterned")
            got = []
            async with asyncio.timeout(10):
                while len(got) < 21:
                    m = await ps.get_message(ignore_subscribe_messages=True, timeout=1)
                    if m is not None:
                        got.append((m["type"], m["channel"], m["data"]))
            # a reader task using listen() (the async-iterator API)
            await ps.unsubscribe(prefix + "ch")
            await ps.punsubscribe()
            ps2 = sub.pubsub(ignore_subscribe_messages=True)
            await ps2.subscribe(prefix + "ch2")

            async def listener():
                async for m in ps2.listen():
                    if m["type"] == "message":
                        return m["data"]

            task = asyncio.create_task(listener())
            await asyncio.sleep(0.05)
            await pub.publish(prefix + "ch2", "via listen")
            listened = await asyncio.wait_for(task, 5)
            await ps2.aclose()
            return confirmations, receivers, got, listened
        finally:
            await ps.aclose()
            await sub.aclose()
            await pub.aclose()

    confirmations, receivers, got, listened = run(main)
    assert confirmations == ["subscribe", "psubscribe"]
    assert receivers == [1] * 20
    ch = (prefix + "ch").encode()
    assert got[:20] == [("message", ch, f"m{i}".encode()) for i in range(20)]
    assert got[20] == ("pmessage", (prefix + "pat.x").encode(), b"patterned")
    assert listened == b"via listen"


def test_blocking_pops(run, redis_server, prefix):
    async def main():
        a = client(redis_server)
        b = client(redis_server)
        try:
            loop = asyncio.get_running_loop()
            # BLPOP that a second client unblocks with RPUSH
            t0 = loop.time()
            waiter = asyncio.create_task(a.blpop([prefix + "q"], timeout=10))
            await asyncio.sleep(0.2)
            assert not waiter.done()
            await b.rpush(prefix + "q", "job-1")
            popped = await asyncio.wait_for(waiter, 10)
            unblocked_after = loop.time() - t0
            # BLPOP with a timeout on an empty list returns None
            t0 = loop.time()
            nothing = await a.blpop([prefix + "empty"], timeout=0.3)
            timed_out_after = loop.time() - t0
            # several blocked clients served in FIFO order
            clients = [client(redis_server) for _ in range(3)]
            try:
                waiters = []
                for c in clients:
                    waiters.append(asyncio.create_task(c.brpop([prefix + "fifo"], timeout=10)))
                    await asyncio.sleep(0.05)
                await b.lpush(prefix + "fifo", "1", "2", "3")
                fifo = await asyncio.wait_for(asyncio.gather(*waiters), 10)
            finally:
                for c in clients:
                    await c.aclose()
            # a cancelled blocking call does not poison the connection pool
            t = asyncio.create_task(a.blpop([prefix + "never"], timeout=10))
            await asyncio.sleep(0.1)
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
            await a.set(prefix + "after", "ok")
            after = await a.get(prefix + "after")
            return popped, unblocked_after, nothing, timed_out_after, fifo, after
        finally:
            await a.aclose()
            await b.aclose()

    popped, unblocked_after, nothing, timed_out_after, fifo, after = run(main)
    assert popped == ((prefix + "q").encode(), b"job-1")
    assert 0.15 <= unblocked_after < 5
    assert nothing is None
    assert 0.25 <= timed_out_after < 3
    key = (prefix + "fifo").encode()
    assert fifo == [(key, b"1"), (key, b"2"), (key, b"3")]
    assert after == b"ok"


def test_connection_pool_concurrency(run, redis_server, prefix):
    async def main():
        pool = redis_asyncio.BlockingConnectionPool(host=redis_server.host,
                                                    port=redis_server.port, timeout=10,
                                                    max_connections=8)
        r = redis_asyncio.Redis(connection_pool=pool)
        try:
            async def worker(k):
                for i in range(50):
                    await r.incr(prefix + "ctr")
                    await r.rpush(prefix + f"w{k}", i)
                return await r.llen(prefix + f"w{k}")

            lens = await asyncio.gather(*(worker(k) for k in range(16)))
            total = int(await r.get(prefix + "ctr"))
            created = len(pool._available_connections) + len(pool._in_use_connections)
            return lens, total, created
        finally:
            await r.aclose()
            await pool.aclose()

    lens, total, created = run(main)
    assert lens == [50] * 16
    assert total == 800
    assert 1 <= created <= 8
