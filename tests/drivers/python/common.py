"""Shared settings and helpers of the Python driver tests (tests/drivers/python/*.py).

scripts/test-drivers sets the DRV_* environment variables:
  DRV_HOST, DRV_PORT, DRV_USER, DRV_PASSWORD, DRV_DB   where to connect (proxy or, as a
                                                        control, the primary directly)
  DRV_READ_PORTS    comma-separated server ports plain reads outside a transaction must show
                    (all of them, within a few tries): the replicas behind the proxy, or the
                    primary alone on a direct connection
  DRV_PRIMARY_PORT  the port transactions and writes must show
"""

import os
import random
import sys
import time
import traceback

HOST = os.environ.get("DRV_HOST", "127.0.0.1")
PORT = int(os.environ["DRV_PORT"])
USER = os.environ.get("DRV_USER", "app")
PASSWORD = os.environ.get("DRV_PASSWORD", "app_pw")
DB = os.environ.get("DRV_DB", "appdb")
READ_PORTS = {int(p) for p in os.environ["DRV_READ_PORTS"].split(",")}
PRIMARY_PORT = int(os.environ["DRV_PRIMARY_PORT"])

# Values every driver test round-trips.
UNICODE = "h\u00e9llo \u2713 \u65e5\u672c\u8a9e \U0001F389 \u00df"
BYTES = bytes([0, 1, 2, 127, 128, 254, 255]) + b"\\x00'\""
NUMERIC = "12345678901234567890.123456789"

_checks = 0


def check(cond, what):
    """Assert with a message; counts passed checks."""
    global _checks
    if not cond:
        raise AssertionError(what)
    _checks += 1


def table_name(driver):
    return "drv_%s_%d_%d" % (driver, os.getpid(), random.randrange(1 << 30))


def poll(fn, what, timeout=5.0):
    """Call fn() until it returns a truthy value (replication lag: the proxy has no
    read-your-writes yet); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = fn()
            if last:
                return last
        except Exception as e:  # the table may not have replicated yet
            last = e
        if time.monotonic() > deadline:
            raise AssertionError("%s: not seen within %.0fs (last: %r)" % (what, timeout, last))
        time.sleep(0.05)


# How long reads may stay on the primary after the session's own writes (a proxy with
# read-your-writes sends them there until the replicas have replayed the writes).
SPREAD_WAIT = 5.0


def _spread_failed(seen, what):
    return "%s: reads went to %s, expected all of %s (and nothing else)" % (what, sorted(set(seen)), sorted(READ_PORTS))


def check_read_ports(fn, what, n=8):
    """fn() runs one plain read outside a transaction and returns inet_server_port(). Passes
    once n reads in a row show exactly READ_PORTS (both replicas behind the proxy, the primary
    on a direct connection); retried for up to SPREAD_WAIT s."""
    deadline = time.monotonic() + SPREAD_WAIT
    while True:
        seen = [fn() for _ in range(n)]
        if set(seen) == READ_PORTS:
            check(True, what)
            return
        if time.monotonic() > deadline:
            check(False, _spread_failed(seen, what))
        time.sleep(0.2)


def check_read_ports_now(seen, what):
    """`seen`: the ports of >= 6 reads of a session that has not written (no retry)."""
    check(set(seen) == READ_PORTS, _spread_failed(seen, what))


async def acheck_read_ports(fn, what, n=8):
    """check_read_ports for a coroutine function."""
    import asyncio
    deadline = time.monotonic() + SPREAD_WAIT
    while True:
        seen = [await fn() for _ in range(n)]
        if set(seen) == READ_PORTS:
            check(True, what)
            return
        if time.monotonic() > deadline:
            check(False, _spread_failed(seen, what))
        await asyncio.sleep(0.2)


def check_tx_ports(seen, what):
    check(set(seen) == {PRIMARY_PORT}, "%s: went to %s, expected only the primary %d" % (what, sorted(set(seen)), PRIMARY_PORT))


_failed = []


def section(name, fn, *args):
    """Run one part of a test; a failure is reported and the next part still runs (they share
    the connection, so later parts may fail as a consequence: read the first failure)."""
    try:
        fn(*args)
    except Exception:
        print("FAILED section %r:" % name, file=sys.stderr)
        traceback.print_exc()
        _failed.append(name)


async def asection(name, fn, *args):
    try:
        await fn(*args)
    except Exception:
        print("FAILED section %r:" % name, file=sys.stderr)
        traceback.print_exc()
        _failed.append(name)


def done(name):
    sys.stderr.flush()
    if _failed:
        print("%s: %d checks passed, FAILED sections: %s" % (name, _checks, ", ".join(_failed)))
        sys.stdout.flush()
        sys.exit(1)
    print("%s: %d checks passed" % (name, _checks))
    sys.stdout.flush()
