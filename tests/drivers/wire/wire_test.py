"""A hand-written frontend (SCRAM-SHA-256 as user app) that replays message sequences the
drivers send, each written in ONE packet so the result does not depend on timing. The drivers
hit these sequences only when the proxy happens to read late; here they always do.

  pg-cursor      Parse/Bind/Describe portal/Flush + Execute(rows)/Flush without waiting
  asyncpg copy   Parse/Describe/Flush (open batch), then Query COPY ... FROM STDIN followed
                 by CopyData/CopyDone without waiting for CopyInResponse
  libpq-less COPY  Query COPY FROM STDIN + CopyData + CopyDone in one packet from idle
  query in batch   a simple Query after an unsynced Flush batch ends that batch (reads after
                 it are plain reads again)

Each case opens its own connection and checks the exact answer of a direct connection.
Runs with the standard library only. DRV_* variables: see tests/drivers/python/common.py.
"""

import base64
import hashlib
import hmac
import os
import socket
import struct
import sys
import traceback

HOST = os.environ.get("DRV_HOST", "127.0.0.1")
PORT = int(os.environ["DRV_PORT"])
DB = os.environ.get("DRV_DB", "appdb")
USER = os.environ.get("DRV_USER", "app")
PASSWORD = os.environ.get("DRV_PASSWORD", "app_pw")
READ_PORTS = {int(p) for p in os.environ["DRV_READ_PORTS"].split(",")}
PRIMARY_PORT = int(os.environ["DRV_PRIMARY_PORT"])
TABLE = "drv_wire_%d" % os.getpid()


def msg(t, body=b""):
    return t + struct.pack("!i", len(body) + 4) + body


def cstr(s):
    return s.encode() + b"\0"


def Q(sql):
    return msg(b"Q", cstr(sql))


def P(name, sql):
    return msg(b"P", cstr(name) + cstr(sql) + struct.pack("!h", 0))


def B(portal, stmt):
    return msg(b"B", cstr(portal) + cstr(stmt) + struct.pack("!hhh", 0, 0, 0))


def D(kind, name):
    return msg(b"D", kind + cstr(name))


def E(portal, rows=0):
    return msg(b"E", cstr(portal) + struct.pack("!i", rows))


def C(kind, name):
    return msg(b"C", kind + cstr(name))


S = msg(b"S")
H = msg(b"H")
CD = msg(b"c")


def d(data):
    return msg(b"d", data)


class Conn:
    def __init__(self):
        self.s = socket.create_connection((HOST, PORT), timeout=5)
        self.buf = b""
        body = struct.pack("!i", 196608) + cstr("user") + cstr(USER) + cstr("database") + cstr(DB) + b"\0"
        self.s.sendall(struct.pack("!i", len(body) + 4) + body)
        self.login()

    def login(self):
        """AuthenticationOk, cleartext, or SCRAM-SHA-256 (RFC 5802/7677), then wait for
        ReadyForQuery."""
        nonce = base64.b64encode(os.urandom(18)).decode()
        first_bare = "n=,r=" + nonce
        server_first = salted = None
        while True:
            f = self.frame(5)
            if f is None or f[0] in ("E", "EOF"):
                raise AssertionError("login failed: %r" % (f and self.show(*f)))
            t, body = f
            if t == "Z":
                return
            if t != "R":
                continue
            code = struct.unpack("!i", body[:4])[0]
            if code == 3:
                self.send(msg(b"p", cstr(PASSWORD)))
            elif code == 10:
                mech = cstr("SCRAM-SHA-256")
                first = ("n,," + first_bare).encode()
                self.send(msg(b"p", mech + struct.pack("!i", len(first)) + first))
            elif code == 11:
                server_first = body[4:].decode()
                attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
                salted = hashlib.pbkdf2_hmac("sha256", PASSWORD.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
                final_bare = "c=biws,r=" + attrs["r"]
                auth = ",".join((first_bare, server_first, final_bare)).encode()
                client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
                sig = hmac.new(hashlib.sha256(client_key).digest(), auth, hashlib.sha256).digest()
                proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, sig))).decode()
                self.send(msg(b"p", (final_bare + ",p=" + proof).encode()))
            elif code not in (0, 12):
                raise AssertionError("unsupported authentication request %d" % code)

    def send(self, *m):
        self.s.sendall(b"".join(m))

    def frame(self, timeout):
        self.s.settimeout(timeout)
        while len(self.buf) < 5 or len(self.buf) < 1 + struct.unpack("!i", self.buf[1:5])[0]:
            try:
                chunk = self.s.recv(65536)
            except socket.timeout:
                return None
            if not chunk:
                return ("EOF", b"")
            self.buf += chunk
        n = 1 + struct.unpack("!i", self.buf[1:5])[0]
        t, body = self.buf[0:1].decode(), self.buf[5:n]
        self.buf = self.buf[n:]
        return t, body

    @staticmethod
    def show(t, body):
        if t in "EN":
            f = dict((x[0:1].decode(), x[1:].decode()) for x in body.split(b"\0") if x)
            return "%s:%s %s" % (t, f.get("C"), f.get("M"))
        if t == "D":
            n = struct.unpack("!h", body[:2])[0]
            vals, off = [], 2
            for _ in range(n):
                ln = struct.unpack("!i", body[off:off + 4])[0]
                off += 4
                vals.append(None if ln < 0 else body[off:off + ln].decode())
                off += max(ln, 0)
            return "D:" + ",".join("NULL" if v is None else v for v in vals)
        if t == "C":
            return "C:" + body[:-1].decode()
        if t == "Z":
            return "Z:" + body.decode()
        return t

    def until(self, stop, timeout=3.0):
        """Frames up to and including the first whose tag is in `stop`; 'TIMEOUT' if none
        came within `timeout` s of the previous frame."""
        out = []
        while True:
            f = self.frame(timeout)
            if f is None:
                out.append("TIMEOUT")
                return out
            out.append(self.show(*f))
            if f[0] in stop or f[0] == "EOF":
                return out

    def close(self):
        try:
            self.send(msg(b"X"))
        except OSError:
            pass
        self.s.close()


checks = 0
failed = []


def expect(got, want, what):
    global checks
    if got != want:
        raise AssertionError("%s:\n      got  %r\n      want %r" % (what, got, want))
    checks += 1


def case(name):
    def wrap(fn):
        def run():
            c = Conn()
            try:
                fn(c)
            except Exception:
                print("FAILED case %r:" % name, file=sys.stderr)
                traceback.print_exc()
                failed.append(name)
            finally:
                c.close()
        run.__name__ = fn.__name__
        CASES.append(run)
        return run
    return wrap


CASES = []


@case("pg-cursor: Execute + Flush sent before the Describe's answer")
def pg_cursor(c):
    c.send(P("", "SELECT g FROM generate_series(1, 7) g"), B("C_1", ""), D(b"P", "C_1"), H, E("C_1", 3), H)
    expect(c.until(("s", "C")), ["1", "2", "T", "D:1", "D:2", "D:3", "s"], "first batch of rows")
    c.send(E("C_1", 3), H)
    expect(c.until(("s", "C")), ["D:4", "D:5", "D:6", "s"], "second batch")
    c.send(E("C_1", 3), H)
    expect(c.until(("s", "C")), ["D:7", "C:SELECT 1"], "last row")
    c.send(C(b"P", "C_1"), S)
    expect(c.until(("Z",)), ["3", "Z:I"], "close + sync")


@case("Flush then Sync in one packet")
def flush_then_sync(c):
    c.send(P("", "SELECT 1"), B("", ""), D(b"P", ""), E(""), H, S)
    expect(c.until(("Z",)), ["1", "2", "T", "D:1", "C:SELECT 1", "Z:I"], "answer up to ReadyForQuery")


@case("COPY FROM STDIN with its data in the same packet (from idle)")
def copy_pipelined(c):
    c.send(Q("COPY %s FROM STDIN" % TABLE), d(b"1\tpipelined\n"), d(b"2\tpipelined\n"), CD)
    expect(c.until(("Z",)), ["G", "C:COPY 2", "Z:I"], "COPY answer")


@case("asyncpg copy_records_to_table: Parse/Describe/Flush, then COPY Query + data unsynced")
def copy_after_open_batch(c):
    c.send(P("intro", "SELECT a, b FROM %s LIMIT 1" % TABLE), D(b"S", "intro"), H)
    expect(c.until(("T", "n")), ["1", "t", "T"], "describe")
    c.send(Q("COPY %s FROM STDIN" % TABLE), d(b"3\tafter-flush\n"), CD)
    expect(c.until(("Z",)), ["G", "C:COPY 1", "Z:I"], "COPY answer")
    c.send(Q("SELECT 1"))
    expect(c.until(("Z",)), ["T", "D:1", "C:SELECT 1", "Z:I"], "next query")


@case("a simple Query ends an unsynced Flush batch")
def query_ends_open_batch(c):
    c.send(P("s1", "SELECT 1"), D(b"S", "s1"), H)
    expect(c.until(("T",)), ["1", "t", "T"], "describe")
    c.send(Q("SELECT 2"))
    expect(c.until(("Z",)), ["T", "D:2", "C:SELECT 1", "Z:I"], "query after the open batch")
    ports = set()
    for _ in range(8):
        c.send(Q("SELECT inet_server_port()"))
        got = c.until(("Z",))
        expect(got[-1], "Z:I", "read")
        ports.add(int(got[1][2:]))
    expect(ports, READ_PORTS, "reads after the batch ended (no Sync was sent)")


@case("CopyData after a COPY that failed to start, in the same packet")
def copy_fails(c):
    c.send(Q("COPY drv_wire_missing FROM STDIN"), d(b"1\tx\n"), CD)
    got = c.until(("Z",))
    expect([g.split(" ")[0] for g in got], ["E:42P01", "Z:I"], "error, then ready")
    c.send(Q("SELECT 3"))
    expect(c.until(("Z",)), ["T", "D:3", "C:SELECT 1", "Z:I"], "usable after")


def main():
    admin = Conn()
    admin.send(Q("CREATE TABLE %s (a int, b text)" % TABLE))
    expect(admin.until(("Z",))[-2:], ["C:CREATE TABLE", "Z:I"], "create table")
    try:
        for run in CASES:
            run()
    finally:
        admin.send(Q("DROP TABLE %s" % TABLE))
        admin.until(("Z",))
        admin.close()
    if failed:
        print("wire: %d checks passed, FAILED cases: %s" % (checks, "; ".join(failed)))
        sys.exit(1)
    print("wire: %d checks passed" % checks)


if __name__ == "__main__":
    main()
