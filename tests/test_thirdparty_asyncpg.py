"""asyncpg (unchanged) on the loop under test against a real PostgreSQL cluster that this module
creates (initdb in a temp dir, run as the unprivileged ``postgres`` user when we are root) on a
free loopback port, with a SCRAM password role, and stops at the end. asyncio is the control;
identical assertions."""
import asyncio
import datetime
import decimal
import io
import json
import uuid

import pytest

asyncpg = pytest.importorskip("asyncpg")

from services import PostgresServer, postgres_bindir  # noqa: E402


@pytest.fixture(scope="session")
def pg():
    if postgres_bindir() is None:
        pytest.skip("PostgreSQL binaries not installed (scripts/setup.sh installs postgresql)")
    srv = PostgresServer()
    try:
        yield srv
    finally:
        srv.stop()


def test_connect_and_queries(run, pg):
    async def main():
        conn = await asyncpg.connect(pg.dsn)
        try:
            user = await conn.fetchval("SELECT current_user")
            one = await conn.fetchrow("SELECT 1 AS a, 'two'::text AS b, NULL::int AS c")
            rows = await conn.fetch("SELECT g, g * g AS sq FROM generate_series(1, 1000) g")
            types = await conn.fetchrow(
                "SELECT $1::numeric AS n, $2::timestamptz AS t, $3::int[] AS arr, "
                "$4::bytea AS b, $5::uuid AS u, $6::jsonb AS j, $7::bool AS flag",
                decimal.Decimal("12345.678901"),
                datetime.datetime(2024, 2, 29, 12, 30, tzinfo=datetime.timezone.utc),
                [1, 2, None, 4], b"\x00\xff" * 1000,
                uuid.UUID(int=42), json.dumps({"k": [1, 2]}), True)
            big = await conn.fetchval("SELECT repeat('x', 5000000)")
            status = await conn.execute("CREATE TEMP TABLE t (id int primary key, v text)")
            await conn.executemany("INSERT INTO t VALUES ($1, $2)",
                                   [(i, f"v{i}") for i in range(200)])
            count = await conn.fetchval("SELECT count(*) FROM t")
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.execute("INSERT INTO t VALUES (1, 'dup')")
            with pytest.raises(asyncpg.PostgresSyntaxError):
                await conn.execute("SELEC 1")
            still_ok = await conn.fetchval("SELECT 2")
            return (user, dict(one), [tuple(r) for r in rows[:3]], len(rows), dict(types),
                    len(big), status, count, still_ok)
        finally:
            await conn.close()

    user, one, head, nrows, types, big_len, status, count, still_ok = run(main)
    assert user == pg.USER
    assert one == {"a": 1, "b": "two", "c": None}
    assert head == [(1, 1), (2, 4), (3, 9)] and nrows == 1000
    assert types["n"] == decimal.Decimal("12345.678901")
    assert types["t"] == datetime.datetime(2024, 2, 29, 12, 30, tzinfo=datetime.timezone.utc)
    assert types["arr"] == [1, 2, None, 4]
    assert types["b"] == b"\x00\xff" * 1000
    assert types["u"] == uuid.UUID(int=42)
    assert json.loads(types["j"]) == {"k": [1, 2]}
    assert types["flag"] is True
    assert big_len == 5_000_000
    assert status == "CREATE TABLE"
    assert count == 200
    assert still_ok == 2


def test_prepared_statements_and_cursor(run, pg):
    async def main():
        conn = await asyncpg.connect(pg.dsn)
        try:
            stmt = await conn.prepare("SELECT $1::int * $2::int AS product")
            products = [await stmt.fetchval(i, 3) for i in range(100)]
            attrs = [a.name for a in stmt.get_attributes()]
            params = [t.name for t in stmt.get_parameters()]
            rows = await stmt.fetch(6, 7)
            # server-side cursor inside a transaction, fetched in batches
            got = []
            async with conn.transaction():
                cur_stmt = await conn.prepare("SELECT g FROM generate_series(1, 2500) g")
                async for rec in cur_stmt.cursor(prefetch=100):
                    got.append(rec["g"])
                cur = await conn.cursor("SELECT g FROM generate_series(1, 10) g")
                first = await cur.fetch(3)
                await cur.forward(2)
                nxt = await cur.fetchrow()
            return products, attrs, params, rows[0]["product"], got, first, nxt
        finally:
            await conn.close()

    products, attrs, params, p, got, first, nxt = run(main)
    assert products == [i * 3 for i in range(100)]
    assert attrs == ["product"]
    assert params == ["int4", "int4"]
    assert p == 42
    assert got == list(range(1, 2501))
    assert [r["g"] for r in first] == [1, 2, 3]
    assert nxt["g"] == 6


def test_copy(run, pg):
    n = 20000

    async def main():
        conn = await asyncpg.connect(pg.dsn)
        try:
            await conn.execute(
                "CREATE TEMP TABLE items (id int, name text, price numeric, tags text[])")
            records = [(i, f"item-{i}", decimal.Decimal(i) / 100, [f"t{i % 7}"])
                       for i in range(n)]
            res = await conn.copy_records_to_table(
                "items", records=records, columns=["id", "name", "price", "tags"])
            total = await conn.fetchval("SELECT sum(id) FROM items")
            # COPY out to a file-like object, CSV
            buf = io.BytesIO()
            out = await conn.copy_from_query(
                "SELECT id, name FROM items WHERE id < $1 ORDER BY id", 5,
                output=buf, format="csv")
            # COPY out to a coroutine sink, streaming the whole table
            chunks = []

            async def sink(data):
                chunks.append(bytes(data))

            await conn.copy_from_table("items", output=sink, columns=["id"])
            # COPY in from an async iterable source
            await conn.execute("CREATE TEMP TABLE raw (line text)")

            async def source():
                for i in range(0, 1000, 100):
                    yield "".join(f"line {j}\n" for j in range(i, i + 100)).encode()

            await conn.copy_to_table("raw", source=source())
            raw = await conn.fetchval("SELECT count(*) FROM raw")
            return res, total, out, buf.getvalue(), b"".join(chunks), raw
        finally:
            await conn.close()

    res, total, out, csv, table_dump, raw = run(main)
    assert res == f"COPY {n}"
    assert total == sum(range(n))
    assert out == "COPY 5"
    assert csv == b"".join(f"{i},item-{i}\n".encode() for i in range(5))
    assert table_dump.split(b"\n")[:-1] == [str(i).encode() for i in range(n)]
    assert raw == 1000


def test_transactions(run, pg):
    async def main():
        conn = await asyncpg.connect(pg.dsn)
        other = await asyncpg.connect(pg.dsn)
        table = f"tx_{uuid.uuid4().hex[:8]}"
        try:
            await conn.execute(f"CREATE TABLE {table} (v int)")
            # commit
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (1), (2)")
                invisible = await other.fetchval(f"SELECT count(*) FROM {table}")
            visible = await other.fetchval(f"SELECT count(*) FROM {table}")
            # rollback on exception
            with pytest.raises(ZeroDivisionError):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES (3)")
                    1 / 0
            # explicit rollback, and a savepoint (nested transaction) rolled back alone
            tr = conn.transaction()
            await tr.start()
            await conn.execute(f"INSERT INTO {table} VALUES (4)")
            await tr.rollback()
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (5)")
                try:
                    async with conn.transaction():
                        await conn.execute(f"INSERT INTO {table} VALUES (6)")
                        raise RuntimeError("inner")
                except RuntimeError:
                    pass
            in_tx_outside = conn.is_in_transaction()
            # a serializable read-only transaction sees exactly the committed rows
            async with conn.transaction(isolation="serializable"):
                vals = sorted(r["v"] for r in await conn.fetch(f"SELECT v FROM {table}"))
            final = sorted(r["v"] for r in await conn.fetch(f"SELECT v FROM {table}"))
            return invisible, visible, in_tx_outside, vals, final
        finally:
            await conn.execute(f"DROP TABLE IF EXISTS {table}")
            await conn.close()
            await other.close()

    invisible, visible, in_tx, vals, final = run(main)
    assert invisible == 0
    assert visible == 2
    assert in_tx is False
    assert vals == final == [1, 2, 5]


def test_listen_notify(run, pg):
    async def main():
        listener = await asyncpg.connect(pg.dsn)
        notifier = await asyncpg.connect(pg.dsn)
        loop = asyncio.get_running_loop()
        got = []
        done = loop.create_future()

        def on_notify(conn, pid, channel, payload):
            got.append((pid == notifier.get_server_pid(), channel, payload))
            if len(got) == 11 and not done.done():
                done.set_result(None)

        try:
            await listener.add_listener("kb_chan", on_notify)
            await notifier.execute("NOTIFY kb_chan, 'hello'")
            for i in range(10):
                await notifier.execute("SELECT pg_notify('kb_chan', $1)", f"n{i}")
            # delivered while the listener connection is otherwise idle
            await asyncio.wait_for(done, 10)
            # notifications sent inside a transaction arrive only at commit
            async with notifier.transaction():
                await notifier.execute("NOTIFY kb_chan, 'in-tx'")
                await asyncio.sleep(0.2)
                before_commit = len(got)
            async with asyncio.timeout(10):
                while len(got) < 12:
                    await asyncio.sleep(0.01)
            await listener.remove_listener("kb_chan", on_notify)
            await notifier.execute("NOTIFY kb_chan, 'ignored'")
            await asyncio.sleep(0.2)
            return got, before_commit
        finally:
            await listener.close()
            await notifier.close()

    got, before_commit = run(main)
    assert got[0] == (True, "kb_chan", "hello")
    assert got[1:11] == [(True, "kb_chan", f"n{i}") for i in range(10)]
    assert before_commit == 11
    assert got[11:] == [(True, "kb_chan", "in-tx")]


def test_pool_and_query_timeout(run, pg):
    async def main():
        async with asyncpg.create_pool(pg.dsn, min_size=2, max_size=5) as pool:
            async def q(i):
                async with pool.acquire() as c:
                    return await c.fetchval("SELECT $1::int FROM pg_sleep(0.05)", i)

            loop = asyncio.get_running_loop()
            t0 = loop.time()
            res = await asyncio.gather(*(q(i) for i in range(20)))
            elapsed = loop.time() - t0
            # a query timeout cancels the statement server side (asyncpg opens a second
            # connection for the cancel request); the connection stays usable
            async with pool.acquire() as c:
                t0 = loop.time()
                with pytest.raises(asyncio.TimeoutError):
                    await c.fetchval("SELECT pg_sleep(10)", timeout=0.3)
                timed_out_after = loop.time() - t0
                after = await c.fetchval("SELECT 'alive'")
            # task cancellation of a running query
            async with pool.acquire() as c:
                task = asyncio.create_task(c.fetchval("SELECT pg_sleep(10)"))
                await asyncio.sleep(0.2)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            async with pool.acquire() as c:
                after_cancel = await c.fetchval("SELECT 7")
            return res, elapsed, timed_out_after, after, after_cancel

    res, elapsed, timed_out_after, after, after_cancel = run(main)
    assert res == list(range(20))
    assert elapsed < 5  # 20 x 50 ms over 5 connections ran concurrently
    assert 0.25 <= timed_out_after < 5
    assert after == "alive"
    assert after_cancel == 7
