"""psycopg 3 (psycopg[binary]) through pgsplit: the extended protocol with unnamed and (with
prepare_threshold=0) named server-side prepared statements, binary results, pipeline mode,
COPY FROM STDIN, executemany, transactions."""

import datetime
import decimal
import threading
import time

import psycopg
import psycopg.errors

from common import (BYTES, DB, HOST, NUMERIC, PASSWORD, PORT, PRIMARY_PORT, READ_PORTS, UNICODE, USER,
                    check, check_read_ports, check_tx_ports, done, poll, section, table_name)

TS = datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=datetime.timezone.utc)


def connect(**kw):
    return psycopg.connect(host=HOST, port=PORT, user=USER, password=PASSWORD, dbname=DB,
                           autocommit=True, **kw)


def one(conn, sql, params=None, **kw):
    return conn.execute(sql, params, **kw).fetchone()[0]


def basic(conn, t, label):
    """The common checks, on a connection with the given prepare_threshold."""
    check(one(conn, "SELECT current_user") == USER, label + ": current_user")
    conn.execute("CREATE TABLE %s (id int PRIMARY KEY, name text, n numeric, ts timestamptz, b bytea, note text)" % t)
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO " + t + " VALUES (%s, %s, %s, %s, %s, %s)",
                        [(i, "row %d %s" % (i, UNICODE), decimal.Decimal(NUMERIC) + i, TS, BYTES, None)
                         for i in range(1, 11)])

    def read(binary):
        rows = conn.execute("SELECT id, name, n, ts, b, note FROM " + t + " ORDER BY id", binary=binary).fetchall()
        return rows if len(rows) == 10 else None
    for binary in (False, True):
        got = poll(lambda: read(binary), "%s: inserted rows (binary=%s)" % (label, binary))
        for i, (id_, name, n, ts, b, note) in enumerate(got, start=1):
            check(id_ == i and name == "row %d %s" % (i, UNICODE), "%s: row %d name %r" % (label, i, name))
            check(n == decimal.Decimal(NUMERIC) + i, "%s: row %d numeric %r" % (label, i, n))
            check(ts == TS, "%s: row %d timestamptz %r" % (label, i, ts))
            check(bytes(b) == BYTES, "%s: row %d bytea" % (label, i))
            check(note is None, "%s: row %d NULL" % (label, i))

    for binary in (False, True):
        r = conn.execute("SELECT %s::text, %s, %s::numeric, %s::timestamptz, %s::bytea, %s::int",
                         (None, UNICODE, decimal.Decimal(NUMERIC), TS, BYTES, 42), binary=binary).fetchone()
        check(r[0] is None and r[1] == UNICODE and r[2] == decimal.Decimal(NUMERIC) and r[3] == TS
              and bytes(r[4]) == BYTES and r[5] == 42, "%s: parameter round trip binary=%s %r" % (label, binary, r))

    check_read_ports(lambda: one(conn, "SELECT inet_server_port()"), label + ": autocommit reads")
    check_read_ports(lambda: one(conn, "SELECT inet_server_port() + %s", (0,)), label + ": reads with a parameter")
    with conn.transaction():
        ports = [one(conn, "SELECT inet_server_port() + %s", (0,)) for _ in range(4)]
        ports += [one(conn, "SELECT inet_server_port()") for _ in range(2)]
    check_tx_ports(ports, label + ": transaction()")

    try:
        conn.execute("SELEC %s", (1,))
        check(False, "syntax error not raised")
    except psycopg.errors.SyntaxError as e:
        check(e.sqlstate == "42601", "%s: sqlstate %s" % (label, e.sqlstate))
    check(one(conn, "SELECT %s::int", (7,)) == 7, label + ": usable after error")
    try:
        with conn.transaction():
            conn.execute("INSERT INTO " + t + " (id) VALUES (%s)", (1,))
        check(False, "duplicate key not raised")
    except psycopg.errors.UniqueViolation as e:
        check(e.sqlstate == "23505", label + ": 23505")
    check(one(conn, "SELECT %s::int", (8,)) == 8, label + ": usable after failed transaction")

    conn.execute("SET search_path TO drv_nowhere, public")
    conn.execute("SET application_name = 'drv_psycopg3_set'")
    for _ in range(6):
        sp, app = conn.execute("SELECT current_setting('search_path'), current_setting(%s)", ("application_name",)).fetchone()
        check(sp == "drv_nowhere, public", "%s: search_path %r" % (label, sp))
        check(app == "drv_psycopg3_set", "%s: application_name %r" % (label, app))
    check(one(conn, "SELECT count(*) FROM " + t) == 10, label + ": unqualified table")
    conn.execute("RESET search_path")

    # The same statement many times (prepared after prepare_threshold uses).
    for i in range(40):
        k = 1 + i % 10
        check(one(conn, "SELECT name FROM " + t + " WHERE id = %s", (k,)) == "row %d %s" % (k, UNICODE),
              "%s: repeated statement %d" % (label, i))
    check(one(conn, "SELECT count(*) FROM pg_prepared_statements") >= 0, label + ": pg_prepared_statements")


def pipeline(conn, t):
    """Pipeline mode: several statements per Sync, results read back later."""
    with conn.pipeline() as p:
        curs = []
        for i in range(100, 110):
            conn.execute("INSERT INTO " + t + " (id, name) VALUES (%s, %s)", (i, "p%d" % i))
        for i in range(100, 110):
            curs.append(conn.execute("SELECT %s::int * 2, inet_server_port()", (i,)))
        p.sync()
        got = [c.fetchone() for c in curs]
    check([g[0] for g in got] == [2 * i for i in range(100, 110)], "pipeline results %r" % got)
    # Reads in a pipeline with writes share one batch: they run where the writes run.
    check({g[1] for g in got} == {PRIMARY_PORT}, "pipeline batch with writes on the primary: %r" % {g[1] for g in got})
    poll(lambda: one(conn, "SELECT count(*) FROM " + t + " WHERE id >= 100") == 10, "pipeline inserts")

    # A read-only pipeline, with executemany and an error in the middle.
    with conn.pipeline():
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO " + t + " (id, name) VALUES (%s, %s)", [(i, "m%d" % i) for i in range(200, 220)])
        c1 = conn.execute("SELECT count(*) FROM " + t + " WHERE id >= 200")
        r1 = c1.fetchone()[0]
    check(r1 == 20, "pipeline executemany then read in the same pipeline: %r" % r1)
    try:
        with conn.pipeline():
            conn.execute("SELECT 1")
            conn.execute("SELEC 2")
            conn.execute("SELECT 3")
        check(False, "pipeline error not raised")
    except psycopg.errors.SyntaxError as e:
        check(e.sqlstate == "42601", "pipeline sqlstate %s" % e.sqlstate)
    check(one(conn, "SELECT %s::int", (9,)) == 9, "usable after pipeline error")
    # A pipeline of reads only: wherever it runs, every statement answers, in order.
    with conn.pipeline():
        curs = [conn.execute("SELECT %s::int, inet_server_port()", (i,)) for i in range(6)]
    got = [c.fetchone() for c in curs]
    check([g[0] for g in got] == list(range(6)), "read-only pipeline results %r" % got)
    check({g[1] for g in got} <= READ_PORTS | {PRIMARY_PORT}, "read-only pipeline ports %r" % got)


def copy(conn, t):
    with conn.cursor() as cur:
        with cur.copy("COPY " + t + " (id, name, b) FROM STDIN") as cp:
            for i in range(300, 350):
                cp.write_row((i, "c%d %s" % (i, UNICODE), BYTES))
        check(cur.rowcount == 50, "COPY rowcount %r" % cur.rowcount)
        with cur.copy("COPY " + t + " (id, name, n) FROM STDIN (FORMAT binary)") as cp:
            cp.set_types(["int4", "text", "numeric"])
            for i in range(400, 410):
                cp.write_row((i, "bin%d" % i, decimal.Decimal(NUMERIC)))
    poll(lambda: one(conn, "SELECT count(*) FROM " + t + " WHERE id >= 300 AND b = %s", (BYTES,)) == 50, "COPY rows")
    poll(lambda: one(conn, "SELECT count(*) FROM " + t + " WHERE id >= 400 AND n = %s", (decimal.Decimal(NUMERIC),)) == 10, "binary COPY rows")
    with conn.cursor() as cur:
        out = []
        with cur.copy("COPY (SELECT id FROM " + t + " WHERE id BETWEEN 300 AND 304 ORDER BY id) TO STDOUT") as cp:
            for row in cp.rows():
                out.append(int(row[0]))
    check(out == [300, 301, 302, 303, 304], "COPY TO STDOUT %r" % out)


def cursor(conn, t):
    # Named server-side cursor (DECLARE in a transaction, FETCH in batches).
    with conn.transaction():
        with conn.cursor(name="drv_sc") as sc:
            sc.itersize = 7
            sc.execute("SELECT id FROM " + t + " WHERE id < 100 ORDER BY id")
            ids = [r[0] for r in sc]
    check(ids == list(range(1, 11)), "server-side cursor %r" % ids)


def cancel(conn, t):
    # A running read (on a replica) is cancelled through the proxy's cancel key.
    timer = threading.Timer(0.5, conn.cancel)
    timer.start()
    start = time.monotonic()
    try:
        conn.execute("SELECT pg_sleep(10)")
        check(False, "pg_sleep was not cancelled")
    except psycopg.errors.QueryCanceled as e:
        check(e.sqlstate == "57014", "57014")
    finally:
        timer.cancel()
    check(time.monotonic() - start < 5, "cancel took %.1fs" % (time.monotonic() - start))
    check(one(conn, "SELECT %s::int", (3,)) == 3, "usable after cancel")


def main():
    for threshold, label in ((None, "unnamed"), (0, "prepared")):
        conn = connect(prepare_threshold=threshold, application_name="drv_psycopg3")
        t = table_name("psycopg3")
        section(label + ": basic", basic, conn, t, label)
        section(label + ": pipeline", pipeline, conn, t)
        section(label + ": copy", copy, conn, t)
        section(label + ": cursor", cursor, conn, t)
        section(label + ": cancel", cancel, conn, t)
        conn.execute("DROP TABLE IF EXISTS " + t)
        conn.close()
    done("psycopg3")


if __name__ == "__main__":
    main()
