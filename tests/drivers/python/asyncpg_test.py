"""asyncpg through pgsplit: named prepared statements for every query (Parse + Describe +
Flush first, then Bind/Execute/Sync), binary formats, executemany, copy_records_to_table
(binary COPY), transactions, explicit prepare(), cursors, statement_cache_size=0 (unnamed
statements, as used behind PgBouncer), and a pool (its reset query on release)."""

import asyncio
import datetime
import decimal

import asyncpg

from common import (BYTES, DB, HOST, NUMERIC, PASSWORD, PORT, PRIMARY_PORT, READ_PORTS, UNICODE, USER,
                    acheck_read_ports, asection, check, check_read_ports_now, check_tx_ports, done, table_name)

TS = datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=datetime.timezone.utc)
ROWS = [(i, "row %d %s" % (i, UNICODE), decimal.Decimal(NUMERIC) + i, TS, BYTES, None) for i in range(1, 11)]


async def poll(fn, what, timeout=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = None
    while True:
        try:
            last = await fn()
            if last:
                return last
        except asyncpg.UndefinedTableError as e:
            last = e
        if loop.time() > deadline:
            raise AssertionError("%s: not seen within %.0fs (last: %r)" % (what, timeout, last))
        await asyncio.sleep(0.05)


async def connect(**kw):
    return await asyncpg.connect(host=HOST, port=PORT, user=USER, password=PASSWORD, database=DB, **kw)


async def write_and_read(conn, t):
    check(await conn.fetchval("SELECT current_user") == USER, "current_user")
    check(await conn.fetchval("SELECT current_setting('application_name')") == "drv_asyncpg", "startup application_name")
    await conn.execute("CREATE TABLE %s (id int PRIMARY KEY, name text, n numeric, ts timestamptz, b bytea, note text)" % t)
    await conn.executemany("INSERT INTO " + t + " VALUES ($1, $2, $3, $4, $5, $6)", ROWS)

    async def read():
        r = await conn.fetch("SELECT id, name, n, ts, b, note FROM " + t + " WHERE id <= $1 ORDER BY id", 10)
        return r if len(r) == 10 else None
    got = await poll(read, "executemany rows")
    for i, r in enumerate(got, start=1):
        check(tuple(r) == ROWS[i - 1], "row %d: %r" % (i, tuple(r)))


async def round_trip(conn, t):
    r = await conn.fetchrow("SELECT $1::text AS a, $2::text AS b, $3::numeric AS c, $4::timestamptz AS d, $5::bytea AS e, $6::int8 AS f",
                            None, UNICODE, decimal.Decimal(NUMERIC), TS, BYTES, 1 << 40)
    check(tuple(r) == (None, UNICODE, decimal.Decimal(NUMERIC), TS, BYTES, 1 << 40), "parameter round trip %r" % (tuple(r),))


async def copy(t):
    # Its own connection: a failure here closes it. asyncpg prepares an introspection query
    # (Parse + Describe + Flush, no Sync), then sends the COPY Query and the CopyData right
    # behind it without waiting for CopyInResponse.
    conn = await connect()
    try:
        # Read-your-writes follows one session: a new one may read a replica that has not
        # replayed the CREATE TABLE yet (asyncpg's introspection of the table is a read).
        async def on_every_replica():
            for _ in range(4):
                if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", t):
                    return False
            return True
        await poll(on_every_replica, "the table on every replica")
        for rnd, base in enumerate((100, 150)):
            # The second round has the introspection statement cached: no open batch first.
            res = await asyncio.wait_for(conn.copy_records_to_table(
                t, records=[(i, "copy%d" % i, decimal.Decimal(i), TS, BYTES, UNICODE) for i in range(base, base + 50)],
                columns=["id", "name", "n", "ts", "b", "note"]), 10)
            check(res == "COPY 50", "copy_records_to_table round %d: %r" % (rnd, res))
        await poll(lambda: conn.fetchval("SELECT count(*) = 100 FROM " + t + " WHERE id >= 100 AND note = $1", UNICODE), "copied rows")
        out = []

        async def sink(b):
            out.append(b)
        await asyncio.wait_for(conn.copy_from_query("SELECT id FROM " + t + " WHERE id < 4 ORDER BY id", output=sink), 10)
        check(b"".join(out) == b"1\n2\n3\n", "copy_from_query %r" % out)
    finally:
        conn.terminate()


async def routing(conn, t):
    # Statements asyncpg has prepared (and cached) already: every execution is a plain read.
    for sql, args in (("SELECT inet_server_port()", ()), ("SELECT inet_server_port() + $1", (0,))):
        await conn.fetchval(sql, *args)
        await acheck_read_ports(lambda: conn.fetchval(sql, *args), "cached statement %r" % sql)
    async with conn.transaction():
        ports = [await conn.fetchval("SELECT inet_server_port()") for _ in range(3)]
        ports += [await conn.fetchval("SELECT inet_server_port() + $1", 0) for _ in range(3)]
        await conn.execute("UPDATE " + t + " SET note = $1 WHERE id = $2", "tx", 1)
        check(await conn.fetchval("SELECT note FROM " + t + " WHERE id = 1") == "tx", "read own write in a transaction")
    check_tx_ports(ports, "transaction")
    tr = conn.transaction(isolation="repeatable_read", readonly=True)
    await tr.start()
    ro = [await conn.fetchval("SELECT inet_server_port()") for _ in range(3)]
    await tr.commit()
    check(len(set(ro)) == 1 and ro[0] in READ_PORTS | {PRIMARY_PORT}, "read-only transaction on one server %r" % ro)
    try:
        async with conn.transaction():
            await conn.execute("INSERT INTO " + t + " (id) VALUES ($1)", 1)
        check(False, "duplicate key not raised")
    except asyncpg.UniqueViolationError as e:
        check(e.sqlstate == "23505", "23505")


async def first_use_routing(t):
    # A statement's first execution: asyncpg sends Parse + Describe + Flush, waits for the
    # description, then Bind + Execute + Sync. That is still a plain read. A new connection
    # that has not written: no retries (asyncpg's statement cache holds 100 statements; once
    # full, a Close + Sync of an evicted one comes between the two halves).
    conn = await connect()
    try:
        ports = [await conn.fetchval("SELECT inet_server_port() + %d" % i) - i for i in range(8)]
        check_read_ports_now(ports, "first executions of 8 new statements")
    finally:
        await conn.close()


async def errors(conn, t):
    for sql, args in (("SELEC 1", ()), ("SELEC $1", (1,))):
        try:
            await conn.fetch(sql, *args)
            check(False, "syntax error not raised")
        except asyncpg.PostgresSyntaxError as e:
            check(e.sqlstate == "42601", "sqlstate %s" % e.sqlstate)
        check(await conn.fetchval("SELECT $1::int", 5) == 5, "usable after syntax error")


async def settings(conn, t):
    await conn.execute("SET search_path TO drv_nowhere, public")
    await conn.execute("SET application_name = 'drv_asyncpg_set'")
    for _ in range(6):
        r = await conn.fetchrow("SELECT current_setting('search_path') AS sp, current_setting($1) AS app", "application_name")
        check(r["sp"] == "drv_nowhere, public", "search_path %r" % r["sp"])
        check(r["app"] == "drv_asyncpg_set", "application_name %r" % r["app"])
    check(await conn.fetchval("SELECT count(*) FROM " + t + " WHERE id <= 10") == 10, "unqualified table")
    await conn.execute("RESET search_path")
    await conn.execute("RESET application_name")


async def prepared(conn, t):
    stmt = await conn.prepare("SELECT name, inet_server_port() FROM " + t + " WHERE id = $1")
    await stmt.fetchrow(1)  # the first execution: see first_use_routing
    for i in range(60):
        k = 1 + i % 10
        name, port = await stmt.fetchrow(k)
        check(name == "row %d %s" % (k, UNICODE), "prepared use %d: %r" % (i, name))
    await acheck_read_ports(lambda: stmt.fetchval(1, column=1), "prepared statement")
    check([a.name for a in stmt.get_attributes()] == ["name", "inet_server_port"], "prepared attributes")
    check(len(stmt.get_parameters()) == 1, "prepared parameters")


async def cursors(conn, t):
    async with conn.transaction():
        ids = [r["id"] async for r in conn.cursor("SELECT id FROM " + t + " WHERE id < $1 ORDER BY id", 11, prefetch=3)]
        cur = await conn.cursor("SELECT id FROM " + t + " WHERE id <= 10 ORDER BY id")
        first = await cur.fetch(5)
        await cur.forward(3)
        nxt = await cur.fetchrow()
    check(ids == list(range(1, 11)), "cursor %r" % ids)
    check([r["id"] for r in first] == [1, 2, 3, 4, 5] and nxt["id"] == 9, "cursor fetch/forward %r %r" % (first, nxt))


async def alter(conn, t):
    # The cached statement's result type changes: asyncpg re-prepares.
    await conn.execute("ALTER TABLE " + t + " ADD COLUMN extra int DEFAULT 3")

    async def extra():
        return (await conn.fetchrow("SELECT * FROM " + t + " WHERE id = $1", 1)).get("extra") == 3
    await poll(extra, "new column")


async def introspection(t):
    # Types without a built-in codec (int[] here; enums, domains, composites ...) make asyncpg
    # introspect them, wrapped in set_config('jit', 'off', false) ... set_config('jit', $1, false).
    conn = await connect()
    try:
        arr = await conn.fetchval("SELECT $1::int[]", [1, None, 3])
        check(arr == [1, None, 3], "int[] %r" % arr)
        check(await conn.fetchval("SELECT current_setting('jit')") == "on", "jit restored")
        await conn.fetchval("SELECT inet_server_port()")
        await acheck_read_ports(lambda: conn.fetchval("SELECT inet_server_port()"), "reads after type introspection")
    finally:
        await conn.close()


async def no_cache(t):
    # statement_cache_size=0: unnamed statements, Parse + Describe + Flush, then
    # Parse + Bind + Execute + Sync every time.
    conn = await connect(statement_cache_size=0)
    try:
        await acheck_read_ports(lambda: conn.fetchval("SELECT inet_server_port()"), "statement_cache_size=0 reads")
        await acheck_read_ports(lambda: conn.fetchval("SELECT inet_server_port() + $1", 0),
                                "statement_cache_size=0 reads with a parameter")
        check(await conn.fetchval("SELECT count(*) FROM " + t + " WHERE id < $1", 11) == 10, "statement_cache_size=0 count")
        async with conn.transaction():
            check_tx_ports([await conn.fetchval("SELECT inet_server_port() + $1", 0) for _ in range(3)], "statement_cache_size=0 transaction")
    finally:
        await conn.close()


async def pool():
    # Connections are reset (RESET ALL, UNLISTEN *, CLOSE ALL, advisory unlock) on release.
    p = await asyncpg.create_pool(host=HOST, port=PORT, user=USER, password=PASSWORD, database=DB, min_size=1, max_size=2)
    try:
        for i in range(6):
            async with p.acquire() as c:
                await c.execute("SET application_name = 'pool%d'" % i)
                check(await c.fetchval("SELECT current_setting('application_name')") == "pool%d" % i, "pool SET %d" % i)
                check(await c.fetchval("SELECT $1::int + 1", i) == i + 1, "pool query %d" % i)
        async with p.acquire() as c:
            app = await c.fetchval("SELECT current_setting('application_name')")
            check(app == "", "pool reset: application_name %r" % app)
    finally:
        await p.close()
    # A pooled connection that listened and took a session advisory lock reads from the
    # primary (pgsplit pins it) until its release's reset takes both back: the next user of
    # the same connection reads from the replicas again.
    p = await asyncpg.create_pool(host=HOST, port=PORT, user=USER, password=PASSWORD, database=DB, min_size=1, max_size=1)
    try:
        async with p.acquire() as c:
            await c.add_listener("drv_asyncpg_channel", lambda *args: None)
            await c.execute("SELECT pg_advisory_lock(7707)")
            port = await c.fetchval("SELECT inet_server_port()")
            check(port == PRIMARY_PORT, "a listening, locking connection reads on the primary (%r)" % port)
        async with p.acquire() as c:
            await acheck_read_ports(lambda: c.fetchval("SELECT inet_server_port()"), "the pool's reset unpins")
            free = await c.fetchval("SELECT pg_try_advisory_lock(7707) AND pg_advisory_unlock(7707)")
            check(free, "the pool's reset released the lock")
    finally:
        await p.close()


async def main():
    conn = await connect(server_settings={"application_name": "drv_asyncpg"})
    t = table_name("asyncpg")
    await asection("write and read", write_and_read, conn, t)
    await asection("round trip", round_trip, conn, t)
    await asection("copy", copy, t)
    await asection("routing", routing, conn, t)
    await asection("errors", errors, conn, t)
    await asection("settings", settings, conn, t)
    await asection("prepared", prepared, conn, t)
    await asection("cursors", cursors, conn, t)
    await asection("alter", alter, conn, t)
    await asection("first-use routing", first_use_routing, t)
    await asection("type introspection", introspection, t)
    await asection("statement_cache_size=0", no_cache, t)
    await asection("pool", pool)
    await conn.execute("DROP TABLE " + t)
    await conn.close()
    done("asyncpg")


if __name__ == "__main__":
    asyncio.run(main())
