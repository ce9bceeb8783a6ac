#!/usr/bin/env python3
"""Turn captured client traffic into seed corpora for the fuzz targets.

`scripts/fuzz seed` runs the integration tests with the `capture` feature and
PGSPLIT_CAPTURE_DIR set: the proxy then writes each client connection's raw bytes to a
`client-*.bin` file and each config text it parses to a `config-*.toml` file. This splits
them into one seed directory per target, in each target's input format (see the header of
each file in fuzz_targets/):

  startup_packet     knob byte + the packets before the first StartupMessage/CancelRequest
  frontend_frames    knob byte + the tagged frames after the startup packet
  extended_sequence  flags, an empty oracle, the frames after authentication
  classify_sql       each Query / Parse SQL text
  scram              raw mode: a verifier, the client-first and client-final messages
  config             each config text

Connections with the same message-type sequence are kept once, seeds are deduplicated by
content and named by their SHA-1 (as libFuzzer names corpus files), and each target keeps
at most a fixed number of the smallest, so the committed corpus stays small.

Usage: split_capture.py CAPTURE_DIR SEEDS_DIR
"""

import hashlib
import os
import struct
import sys

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

# Most seeds kept per target, and the largest seed file.
LIMITS = {
    "startup_packet": 30,
    "frontend_frames": 60,
    "extended_sequence": 80,
    "classify_sql": 150,
    "scram": 10,
    "config": 30,
}
MAX_SEED = 16 * 1024
MAX_SQL = 4 * 1024

# A verifier for the password "pw" (salt "salt", 1 iteration), for raw SCRAM seeds: the
# captured messages were answered with another nonce, so they exercise the parser only.
VERIFIER = (
    b"SCRAM-SHA-256$1:c2FsdA==$"
    b"+EaynuuIE+kNZZ7GoE+pnzQv/5kf+e05InypZOPMcIE=:"
    b"9LdCgiZ+Gt0s2YxnZ2fWVfxA3EC8ywjX8pP+wYqiW8c="
)


def startup_phase(data):
    """(end of the startup packets, whether a StartupMessage came last)."""
    pos = 0
    while len(data) - pos >= 8:
        (length, code) = struct.unpack_from(">ii", data, pos)
        if length < 8 or length > 10000 or len(data) - pos < length:
            return pos, False
        pos += length
        if code in (SSL_REQUEST, GSSENC_REQUEST):
            continue
        return pos, code != CANCEL_REQUEST
    return pos, False


def frames(data, pos):
    """The whole tagged frames from `pos` on: (tag, body, start, end)."""
    out = []
    while len(data) - pos >= 5:
        tag = data[pos]
        (length,) = struct.unpack_from(">i", data, pos + 1)
        if length < 4 or len(data) - pos < 1 + length:
            break
        out.append((tag, data[pos + 5 : pos + 1 + length], pos, pos + 1 + length))
        pos += 1 + length
    return out


def prefix_within(fs, start, limit):
    """The end of the longest run of whole frames from `start` that fits in `limit` bytes."""
    end = start
    for _, _, _, e in fs:
        if e - start > limit:
            break
        end = e
    return end


def cstr(b):
    nul = b.find(b"\0")
    return b if nul < 0 else b[:nul]


class Seeds:
    def __init__(self):
        self.by_target = {t: {} for t in LIMITS}

    def add(self, target, blob):
        if len(blob) <= MAX_SEED:
            self.by_target[target][hashlib.sha1(blob).hexdigest()] = blob

    def write(self, root):
        for target, seeds in self.by_target.items():
            d = os.path.join(root, target)
            os.makedirs(d, exist_ok=True)
            keep = sorted(seeds.items(), key=lambda kv: (len(kv[1]), kv[0]))
            for name, blob in keep[: LIMITS[target]]:
                with open(os.path.join(d, name), "wb") as f:
                    f.write(blob)
            print(f"{target}: {min(len(keep), LIMITS[target])} seeds ({len(keep)} distinct)")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    capture, root = sys.argv[1], sys.argv[2]
    seeds = Seeds()
    shapes = set()
    for name in sorted(os.listdir(capture)):
        path = os.path.join(capture, name)
        with open(path, "rb") as f:
            data = f.read()
        if name.startswith("config-"):
            seeds.add("config", data)
            continue
        if not name.startswith("client-") or not data:
            continue
        end, logged_in = startup_phase(data)
        if end:
            seeds.add("startup_packet", bytes([0x07]) + data[:end])
        if not logged_in:
            continue
        fs = frames(data, end)
        auth = 0
        while auth < len(fs) and fs[auth][0] == ord("p"):
            auth += 1
        passwords = [f[1] for f in fs[:auth]]
        if len(passwords) == 2 and b"SCRAM-SHA-256\0" in passwords[0][:15]:
            first = passwords[0][len(b"SCRAM-SHA-256\0") + 4 :]
            seeds.add("scram", b"\x01" + bytes(18) + VERIFIER + b"\0" + first + b"\0" + passwords[1])
        for tag, body, _, _ in fs[auth:]:
            sql = None
            if tag == ord("Q"):
                sql = cstr(body)
            elif tag == ord("P"):
                sql = cstr(body[len(cstr(body)) + 1 :])
            if sql is not None and 0 < len(sql) <= MAX_SQL:
                seeds.add("classify_sql", sql)
        shape = bytes(f[0] for f in fs[:64])
        if shape in shapes:
            continue
        shapes.add(shape)
        stop = prefix_within(fs, end, MAX_SEED - 1)
        if stop > end:
            seeds.add("frontend_frames", bytes([0x40]) + data[end:stop])
        if auth < len(fs):
            start = fs[auth][2]
            stop = prefix_within(fs[auth:], start, MAX_SEED - 2)
            if stop > start:
                seeds.add("extended_sequence", b"\x00\x00" + data[start:stop])
    seeds.write(root)


if __name__ == "__main__":
    main()
