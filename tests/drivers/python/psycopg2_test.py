"""psycopg2 (psycopg2-binary) through pgsplit: the simple query protocol, client-side
parameter interpolation, autocommit and implicit transactions, server-side (named) cursors."""

import datetime
import decimal

import psycopg2
import psycopg2.errors
import psycopg2.extras

from common import (BYTES, DB, HOST, NUMERIC, PASSWORD, PORT, PRIMARY_PORT, UNICODE, USER,
                    check, check_read_ports, check_tx_ports, done, poll, table_name)


def connect(**kw):
    return psycopg2.connect(host=HOST, port=PORT, user=USER, password=PASSWORD, dbname=DB, **kw)


def one(cur, sql, params=None):
    cur.execute(sql, params)
    return cur.fetchone()[0]


def main():
    conn = connect(application_name="drv_psycopg2")
    conn.autocommit = True
    cur = conn.cursor()
    t = table_name("psycopg2")
    check(one(cur, "SELECT current_user") == USER, "current_user")

    # A write: DDL and inserts with parameters.
    cur.execute("CREATE TABLE %s (id int PRIMARY KEY, name text, n numeric, ts timestamptz, b bytea, note text)" % t)
    ts = datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=datetime.timezone.utc)
    rows = [(i, "row %d %s" % (i, UNICODE), decimal.Decimal(NUMERIC) + i, ts, psycopg2.Binary(BYTES), None)
            for i in range(1, 6)]
    cur.executemany("INSERT INTO " + t + " VALUES (%s, %s, %s, %s, %s, %s)", rows)
    psycopg2.extras.execute_values(cur, "INSERT INTO " + t + " (id, name) VALUES %s", [(i, "ev%d" % i) for i in range(6, 11)])
    check(cur.rowcount == 5, "execute_values rowcount")

    # Read back (a replica: poll until replicated).
    def read():
        cur.execute("SELECT id, name, n, ts, b, note FROM " + t + " WHERE id <= 5 ORDER BY id")
        r = cur.fetchall()
        return r if len(r) == 5 else None
    got = poll(read, "inserted rows")
    for i, (id_, name, n, tsv, b, note) in enumerate(got, start=1):
        check(id_ == i and name == "row %d %s" % (i, UNICODE), "row %d name" % i)
        check(n == decimal.Decimal(NUMERIC) + i, "row %d numeric %r" % (i, n))
        check(tsv == ts, "row %d timestamptz %r" % (i, tsv))
        check(bytes(b) == BYTES, "row %d bytea %r" % (i, bytes(b)))
        check(note is None, "row %d NULL" % i)
    poll(lambda: one(cur, "SELECT count(*) FROM " + t) == 10, "10 rows")

    # Parameter round trips.
    cur.execute("SELECT %s::text, %s, %s::numeric, %s::timestamptz, %s::bytea, %s::int",
                (None, UNICODE, decimal.Decimal(NUMERIC), ts, psycopg2.Binary(BYTES), 42))
    r = cur.fetchone()
    check(r[0] is None and r[1] == UNICODE and r[2] == decimal.Decimal(NUMERIC) and r[3] == ts
          and bytes(r[4]) == BYTES and r[5] == 42, "parameter round trip %r" % (r,))

    # Reads outside a transaction are spread; a transaction stays on the primary.
    check_read_ports(lambda: one(cur, "SELECT inet_server_port()"), "autocommit reads")
    cur.execute("BEGIN")
    ports = [one(cur, "SELECT inet_server_port()") for _ in range(4)]
    cur.execute("COMMIT")
    check_tx_ports(ports, "BEGIN ... COMMIT")
    # psycopg2's default (autocommit off) opens a transaction before the first statement.
    conn.autocommit = False
    ports = [one(cur, "SELECT inet_server_port()") for _ in range(4)]
    check(conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INTRANS, "in transaction")
    conn.rollback()
    check_tx_ports(ports, "implicit transaction")
    conn.autocommit = True

    # Syntax error: SQLSTATE 42601, the connection stays usable.
    try:
        cur.execute("SELEC 1")
        check(False, "syntax error not raised")
    except psycopg2.errors.SyntaxError as e:
        check(e.pgcode == "42601", "pgcode %s" % e.pgcode)
    check(one(cur, "SELECT 7") == 7, "usable after error")
    # Error inside a transaction: aborted until ROLLBACK, then fine.
    cur.execute("BEGIN")
    try:
        cur.execute("SELECT 1/0")
        check(False, "division by zero not raised")
    except psycopg2.errors.DivisionByZero as e:
        check(e.pgcode == "22012", "pgcode 22012")
    try:
        cur.execute("SELECT 1")
        check(False, "aborted transaction accepted a statement")
    except psycopg2.errors.InFailedSqlTransaction:
        pass
    cur.execute("ROLLBACK")
    check(one(cur, "SELECT 8") == 8, "usable after rollback")

    # Session settings reach every backend.
    cur.execute("SET search_path TO drv_nowhere, public")
    cur.execute("SET application_name = 'drv_psycopg2_set'")
    for _ in range(6):
        cur.execute("SELECT current_setting('search_path'), current_setting('application_name'), inet_server_port()")
        sp, app, _port = cur.fetchone()
        check(sp == "drv_nowhere, public", "search_path %r" % sp)
        check(app == "drv_psycopg2_set", "application_name %r" % app)
    # Unqualified names resolve through the search_path on the replicas too.
    check(one(cur, "SELECT count(*) FROM " + t) == 10, "unqualified table")
    cur.execute("RESET search_path")
    check_read_ports(lambda: one(cur, "SELECT inet_server_port()"), "reads after SET")

    # Same statement many times.
    for i in range(30):
        check(one(cur, "SELECT name FROM " + t + " WHERE id = %s", (6 + i % 5,)) == "ev%d" % (6 + i % 5), "repeat %d" % i)

    # Server-side (named) cursor: DECLARE inside a transaction, FETCH in batches.
    conn.autocommit = False
    with conn.cursor(name="drv_cursor") as sc:
        sc.itersize = 3
        sc.execute("SELECT id FROM " + t + " ORDER BY id")
        ids = [r[0] for r in sc]
    conn.commit()
    check(ids == list(range(1, 11)), "named cursor %r" % ids)
    conn.autocommit = True

    # UPDATE ... RETURNING and DELETE go to the primary.
    cur.execute("UPDATE " + t + " SET note = %s WHERE id = %s RETURNING inet_server_port()", ("x", 1))
    check(cur.fetchone()[0] == PRIMARY_PORT, "UPDATE RETURNING on the primary")

    cur.execute("DROP TABLE " + t)
    conn.close()
    done("psycopg2")


if __name__ == "__main__":
    main()
