#!/usr/bin/env python3
"""Independent verifier of a flowledger export directory.

Written from docs/EVENTS.md alone (sections 2, 3, 4, 5, 8 and 9), with
Python's standard library only: it shares no code with the Rust verifier
(src/audit), so that the two reaching the same verdict on the same export
means the specification is enough to check one.  Ed25519 (RFC 8032) is
implemented below in pure Python, after the reference code of RFC 8032
section 6.

Run `verify_export.py --help` for what is checked and the exit codes, and
`verify_export.py --self-test` to check the test vectors of docs/EVENTS.md
and RFC 8032.
"""

import argparse
import datetime
import hashlib
import hmac
import json
import os
import re
import sys
import tempfile

EXPORT_FORMAT = "flowledger-export-v2"
CHECKPOINT_V1 = "flowledger-checkpoint-v1"
CHECKPOINT_V2 = "flowledger-checkpoint-v2"
MANIFEST_SIG_PREFIX = b"flowledger-export-manifest-v2\n"

MANIFEST_FILE = "manifest.json"
MANIFEST_SIG_FILE = "manifest.sig"
INDEX_FILE = "index.jsonl"
MESSAGES_FILE = "messages.jsonl"
CHECKPOINTS_FILE = "checkpoints.jsonl"

MANIFEST_FIELDS = (
    "format", "stream", "from_seq", "to_seq", "start_digest", "end_digest",
    "filter", "created_at", "messages_in_range", "messages_included",
    "events_included",
)
FILTER_FIELDS = ("aggregate_type", "aggregate_id", "from_seq", "to_seq")

# Section 2: exactly these headers, no other.
H_MSG_ID = "Nats-Msg-Id"
H_EXPECTED = "Nats-Expected-Last-Subject-Sequence"
H_CHAIN_HEAD = "Flowledger-Chain-Head"
H_COMMAND_HASH = "Flowledger-Command-Hash"
H_FORMAT = "Flowledger-Format"
HEADERS = (H_MSG_ID, H_EXPECTED, H_CHAIN_HEAD, H_COMMAND_HASH, H_FORMAT)
# and, optionally, a W3C trace context as flowledger writes it (covered by
# no hash: trace ids are not history)
H_TRACEPARENT = "traceparent"
TRACEPARENT_RE = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def is_written_traceparent(value):
    if not isinstance(value, str) or not TRACEPARENT_RE.fullmatch(value):
        return False
    _, trace_id, span_id, _ = value.split("-")
    return trace_id != "0" * 32 and span_id != "0" * 16

NO_RING = "not checked: no key ring given"
ZERO32 = bytes(32)
U64_MAX = 2**64 - 1

HEX64 = re.compile(r"[0-9a-f]{64}\Z")            # a hash: 64 lowercase hex
HEX_ANY = re.compile(r"(?:[0-9a-fA-F]{2})+\Z")   # key material / signatures
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
DECIMAL = re.compile(r"(?:0|[1-9][0-9]*)\Z")     # no sign, no leading zeros
RFC3339_UTC = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.\d+)?(?:[Zz]|\+00:00)\Z"
)


def sha256(data):
    return hashlib.sha256(data).digest()


# ---------------------------------------------------------------------------
# Ed25519 (RFC 8032), after the reference implementation of its section 6.
# Verification is what the verifier uses; _ed25519_public / _ed25519_sign are
# private helpers for --self-test only.

_P = 2**255 - 19
_D = -121665 * pow(121666, _P - 2, _P) % _P
_Q = 2**252 + 27742317777372353535851937790883648493   # the group order L
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _inv(x):
    return pow(x, _P - 2, _P)


def _point_add(P, Q):
    # extended homogeneous coordinates (X, Y, Z, T), x = X/Z, y = Y/Z, xy = T/Z
    A = (P[1] - P[0]) * (Q[1] - Q[0]) % _P
    B = (P[1] + P[0]) * (Q[1] + Q[0]) % _P
    C = 2 * P[3] * Q[3] * _D % _P
    D = 2 * P[2] * Q[2] % _P
    E, F, G, H = B - A, D - C, D + C, B + A
    return (E * F % _P, G * H % _P, F * G % _P, E * H % _P)


def _point_mul(s, P):
    Q = (0, 1, 1, 0)   # the neutral element
    while s > 0:
        if s & 1:
            Q = _point_add(Q, P)
        P = _point_add(P, P)
        s >>= 1
    return Q


def _point_equal(P, Q):
    if (P[0] * Q[2] - Q[0] * P[2]) % _P != 0:
        return False
    if (P[1] * Q[2] - Q[1] * P[2]) % _P != 0:
        return False
    return True


def _recover_x(y, sign):
    if y >= _P:
        return None
    x2 = (y * y - 1) * _inv(_D * y * y + 1) % _P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P != 0:
        return None
    if (x & 1) != sign:
        x = _P - x
    return x


_G_Y = 4 * _inv(5) % _P
_G_X = _recover_x(_G_Y, 0)
_G = (_G_X, _G_Y, 1, _G_X * _G_Y % _P)


def _point_compress(P):
    zinv = _inv(P[2])
    x = P[0] * zinv % _P
    y = P[1] * zinv % _P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def _point_decompress(s):
    if len(s) != 32:
        return None
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    if x is None:
        return None
    return (x, y, 1, x * y % _P)


def _sha512_modq(data):
    return int.from_bytes(hashlib.sha512(data).digest(), "little") % _Q


def _secret_expand(seed):
    if len(seed) != 32:
        raise ValueError("an Ed25519 seed is 32 bytes")
    h = hashlib.sha512(seed).digest()
    a = int.from_bytes(h[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    return a, h[32:]


def _ed25519_public(seed):
    a, _ = _secret_expand(seed)
    return _point_compress(_point_mul(a, _G))


def _ed25519_sign(seed, msg):
    a, prefix = _secret_expand(seed)
    A = _point_compress(_point_mul(a, _G))
    r = _sha512_modq(prefix + msg)
    R = _point_compress(_point_mul(r, _G))
    h = _sha512_modq(R + A + msg)
    s = (r + h * a) % _Q
    return R + s.to_bytes(32, "little")


def ed25519_public_key_valid(public):
    return len(public) == 32 and _point_decompress(public) is not None


def ed25519_verify(public, msg, signature):
    """RFC 8032 section 5.1.7 verification (the [S]B = R + [k]A form)."""
    if len(public) != 32 or len(signature) != 64:
        return False
    A = _point_decompress(public)
    if A is None:
        return False
    Rs = signature[:32]
    R = _point_decompress(Rs)
    if R is None:
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= _Q:
        return False
    k = _sha512_modq(Rs + public + msg)
    return _point_equal(_point_mul(s, _G), _point_add(R, _point_mul(k, A)))


# ---------------------------------------------------------------------------
# Verdicts


class Broken(Exception):
    """History or signature failure: exit 1, {"ok": false, "seq", "reason"}."""

    def __init__(self, seq, reason):
        super().__init__(reason)
        self.seq = seq
        self.reason = reason


class Unusable(Exception):
    """Usage error or unreadable/malformed export file: exit 2, no verdict."""


def _no_duplicates(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


def loads(text):
    """Strict JSON: no duplicate keys, no NaN/Infinity."""
    return json.loads(text, object_pairs_hook=_no_duplicates,
                      parse_constant=_no_constants)


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def utf8(s, where):
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:
        raise Unusable(f"{where}: string is not valid Unicode (lone surrogate)")


def read_jsonl(path, name):
    """Yield (line number, parsed object) for each line of a .jsonl file."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise Unusable(f"cannot read {name}: {e.strerror or e}")
    with f:
        for lineno, raw in enumerate(f, 1):
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            try:
                obj = loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise Unusable(f"{name} line {lineno} is not JSON: {e}")
            if not isinstance(obj, dict):
                raise Unusable(f"{name} line {lineno} is not a JSON object")
            yield lineno, obj


def fmt_int(n):
    return f"{n:,}"


# ---------------------------------------------------------------------------
# Key ring (section 5)


def load_ring(path):
    """{key_id: ("ed25519", public key bytes) | ("hmac-sha256", secret bytes)}"""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise Unusable(f"cannot read key ring {path}: {e.strerror or e}")
    try:
        doc = loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise Unusable(f"key ring {path} is not JSON: {e}")
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise Unusable(f'key ring {path}: expected {{"keys": [...]}}')
    ring = {}
    for i, entry in enumerate(doc["keys"]):
        where = f"key ring {path}, entry {i}"
        if not isinstance(entry, dict):
            raise Unusable(f"{where} is not an object")
        key_id = entry.get("key_id")
        if not isinstance(key_id, str) or not KEY_ID.match(key_id):
            raise Unusable(f"{where}: key_id must be 1 to 64 characters of A-Z a-z 0-9 . _ -")
        if key_id in ring:
            raise Unusable(f"{where}: key id {key_id!r} is not unique")
        alg = entry.get("algorithm")
        if alg == "ed25519":
            pk = entry.get("public_key")
            if not isinstance(pk, str) or len(pk) != 64 or not HEX_ANY.match(pk):
                raise Unusable(f"{where}: public_key must be 64 hex digits")
            pkb = bytes.fromhex(pk)
            if not ed25519_public_key_valid(pkb):
                raise Unusable(f"{where}: public_key is not an Ed25519 point")
            ring[key_id] = ("ed25519", pkb)
        elif alg == "hmac-sha256":
            secret = entry.get("secret")
            if not isinstance(secret, str) or len(secret) < 64 or not HEX_ANY.match(secret):
                raise Unusable(f"{where}: secret must be 64 or more hex digits")
            ring[key_id] = ("hmac-sha256", bytes.fromhex(secret))
        else:
            raise Unusable(f"{where}: algorithm must be \"ed25519\" or \"hmac-sha256\"")
    return ring


def parse_digest_arg(text):
    m = re.fullmatch(r"([0-9]+):([0-9a-fA-F]{64})", text or "")
    if not m:
        raise Unusable(f"--digest {text!r}: expected SEQ:HEX (a decimal and 64 hex digits)")
    return int(m.group(1)), m.group(2).lower()


# ---------------------------------------------------------------------------
# Section 4 and 5 primitives


def fold(prev, seq, subject_sha, body_sha):
    """Dn = SHA-256(D(n-1) || u64be(n) || SHA-256(subject) || SHA-256(body))"""
    return sha256(prev + seq.to_bytes(8, "big") + subject_sha + body_sha)


def signing_input(cp):
    parts = (cp["format"], cp["stream"], str(cp["seq"]), cp["digest"],
             cp["created_at"], cp["key_id"])
    return "".join(p + "\n" for p in parts).encode("utf-8")


def filter_selects(flt, subject):
    t, i = flt["aggregate_type"], flt["aggregate_id"]
    if t is None:
        return True
    if i is None:
        return subject.startswith(f"flow.ev.{t}.")
    return subject == f"flow.ev.{t}.{i}"


# ---------------------------------------------------------------------------
# Step 1: the manifest


def _rfc3339_utc(v):
    if not isinstance(v, str):
        return False
    m = RFC3339_UTC.match(v)
    if not m:
        return False
    y, mo, d, h, mi, s = (int(g) for g in m.groups())
    try:
        datetime.datetime(y, mo, d, h, mi, min(s, 59))
    except ValueError:
        return False
    return h < 24 and mi < 60 and s <= 60


def parse_manifest(raw):
    def bad(reason):
        raise Broken(0, f"manifest: {reason}")

    try:
        m = loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        bad(f"manifest.json is not JSON ({e})")
    if not isinstance(m, dict):
        bad("manifest.json is not a JSON object")
    fmt = m.get("format")
    if fmt != EXPORT_FORMAT:
        v = re.fullmatch(r"flowledger-export-v([0-9]+)", fmt) if isinstance(fmt, str) else None
        if v and int(v.group(1)) < 2:
            bad(f"format {fmt} is older than {EXPORT_FORMAT} and is refused: "
                f"export again with a current flowledger")
        bad(f"format is {fmt!r}, not {EXPORT_FORMAT!r}")
    for k in MANIFEST_FIELDS:
        if k not in m:
            bad(f"field {k!r} is missing")
    for k in m:
        if k not in MANIFEST_FIELDS:
            bad(f"unknown field {k!r}")
    if not isinstance(m["stream"], str):
        bad("stream is not a string")
    fs, ts = m["from_seq"], m["to_seq"]
    if not is_int(fs) or fs < 1 or fs > U64_MAX:
        bad("from_seq is not an integer of at least 1")
    if not is_int(ts) or ts < fs - 1 or ts > U64_MAX:
        bad("to_seq is not an integer of at least from_seq - 1")
    for k in ("start_digest", "end_digest"):
        if not isinstance(m[k], str) or not HEX64.match(m[k]):
            bad(f"{k} is not 64 lowercase hex digits")
    if fs == 1 and m["start_digest"] != "0" * 64:
        bad("start_digest is not 64 zeros although from_seq is 1")
    flt = m["filter"]
    if not isinstance(flt, dict):
        bad("filter is not an object")
    for k in FILTER_FIELDS:
        if k not in flt:
            bad(f"filter field {k!r} is missing")
    for k in flt:
        if k not in FILTER_FIELDS:
            bad(f"unknown filter field {k!r}")
    for k in ("aggregate_type", "aggregate_id"):
        if flt[k] is not None and not isinstance(flt[k], str):
            bad(f"filter.{k} is neither a string nor null")
    if flt["aggregate_id"] is not None and flt["aggregate_type"] is None:
        bad("filter.aggregate_id is given without filter.aggregate_type")
    for k in ("from_seq", "to_seq"):
        if flt[k] is not None and not is_int(flt[k]):
            bad(f"filter.{k} is neither an integer nor null")
    if not _rfc3339_utc(m["created_at"]):
        bad("created_at is not an RFC 3339 UTC time")
    for k in ("messages_in_range", "messages_included", "events_included"):
        if not is_int(m[k]) or m[k] < 0:
            bad(f"{k} is not a non-negative integer")
    return m


def check_manifest_sig(raw_manifest, sig_raw, ring):
    """Step 1, manifest.sig with a ring: returns the key id that signed."""
    def bad(reason):
        raise Broken(0, f"manifest.sig: {reason}")

    try:
        sig = loads(sig_raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        bad(f"not JSON ({e})")
    if not isinstance(sig, dict):
        bad("not a JSON object")
    key_id, signature = sig.get("key_id"), sig.get("signature")
    if not isinstance(key_id, str):
        bad("key_id is missing or not a string")
    if not isinstance(signature, str):
        bad("signature is missing or not a string")
    entry = ring.get(key_id)
    if entry is None:
        bad(f"unknown key id {key_id!r}")
    if entry[0] != "ed25519":
        bad(f"wrong algorithm: key {key_id!r} is {entry[0]}, a manifest is signed with ed25519")
    if len(signature) != 128 or not HEX_ANY.match(signature):
        bad("invalid signature (not 128 hex digits)")
    if not ed25519_verify(entry[1], MANIFEST_SIG_PREFIX + raw_manifest, bytes.fromhex(signature)):
        bad(f"invalid signature (key {key_id})")
    return key_id


# ---------------------------------------------------------------------------
# Step 3: one checkpoint


def check_checkpoint(cp, seq, digest_hex, ring):
    """Returns the key id when the checkpoint's signature was verified."""
    fmt = cp.get("format")
    if fmt not in (CHECKPOINT_V1, CHECKPOINT_V2):
        raise Broken(seq, f"checkpoint at {seq} has unknown format {fmt!r}")
    sig_field = "signature" if fmt == CHECKPOINT_V2 else "mac"
    for k in ("stream", "digest", "created_at", "key_id", sig_field):
        if not isinstance(cp.get(k), str):
            raise Broken(seq, f"checkpoint at {seq} is malformed: {k} is missing or not a string")
    if cp["digest"] != digest_hex:
        raise Broken(seq, f"checkpoint at {seq}: its digest differs from the stream digest (altered)")
    if ring is None:
        return None
    key_id = cp["key_id"]
    entry = ring.get(key_id)
    if entry is None:
        raise Broken(seq, f"checkpoint at {seq}: unknown key id {key_id!r}")
    want = "ed25519" if fmt == CHECKPOINT_V2 else "hmac-sha256"
    if entry[0] != want:
        raise Broken(seq, f"checkpoint at {seq}: wrong algorithm: {fmt} needs an {want} key, "
                          f"key {key_id!r} is {entry[0]}")
    data = signing_input(cp)
    value = cp[sig_field]
    if fmt == CHECKPOINT_V2:
        ok = (len(value) == 128 and HEX_ANY.match(value) is not None
              and ed25519_verify(entry[1], data, bytes.fromhex(value)))
    else:
        expected = hmac.new(entry[1], data, hashlib.sha256).digest()
        given = bytes.fromhex(value) if (len(value) == 64 and HEX_ANY.match(value)) else b""
        ok = hmac.compare_digest(expected, given)
    if not ok:
        raise Broken(seq, f"checkpoint at {seq}: invalid signature (key {key_id})")
    return key_id


# ---------------------------------------------------------------------------
# Step 4: one message


class Chains:
    def __init__(self, genesis):
        self.genesis = genesis      # the range starts at 1
        self.heads = {}             # subject -> (version, hash bytes)
        self.last_seq = {}          # subject -> seq of its previous message in range
        self.events = 0


def check_message(seq, msg, chains):
    subject, body_s, headers = msg["subject"], msg["body"], msg["headers"]
    body = utf8(body_s, f"{MESSAGES_FILE} seq {seq} body")
    if not body.endswith(b"\n"):
        raise Broken(seq, "body does not end in a newline")
    lines = body[:-1].split(b"\n")
    first_version = None
    command_id = None
    command_hashes = set()
    head = None
    for n, line in enumerate(lines, 1):
        where = f"event {n} of the message"
        try:
            ev = loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise Broken(seq, f"{where} is not JSON ({e})")
        if not isinstance(ev, dict):
            raise Broken(seq, f"{where} is not a JSON object")
        at, aid, ver = ev.get("aggregate_type"), ev.get("aggregate_id"), ev.get("aggregate_version")
        prev, cid = ev.get("prev_hash"), ev.get("command_id")
        if not isinstance(at, str) or not isinstance(aid, str):
            raise Broken(seq, f"{where} lacks aggregate_type / aggregate_id strings")
        if not is_int(ver) or ver < 1:
            raise Broken(seq, f"{where}: aggregate_version is not an integer of at least 1")
        if not isinstance(prev, str) or not HEX64.match(prev):
            raise Broken(seq, f"{where}: prev_hash is not 64 lowercase hex digits")
        if not isinstance(cid, str):
            raise Broken(seq, f"{where}: command_id is missing or not a string")
        if "command_hash" in ev and not isinstance(ev["command_hash"], str):
            raise Broken(seq, f"{where}: command_hash is not a string")
        if subject != f"flow.ev.{at}.{aid}":
            raise Broken(seq, f"{where} of {at}/{aid} is under the wrong subject {subject}")
        known = chains.heads.get(subject)
        if known is not None:
            kver, khash = known
            if ver != kver + 1:
                raise Broken(seq, f"{where}: version {ver} does not follow {kver} of {at}/{aid}")
            if prev != khash.hex():
                raise Broken(seq, f"{where}: prev_hash is not the hash of version {kver} (chain broken)")
        elif chains.genesis and (ver != 1 or prev != "0" * 64):
            raise Broken(seq, f"{where}: first event of {at}/{aid} in a range from 1 "
                              f"has version {ver} or a non-zero prev_hash")
        head = sha256(bytes.fromhex(prev) + line)
        chains.heads[subject] = (ver, head)
        if first_version is None:
            first_version = ver
        if command_id is None:
            command_id = cid
        elif cid != command_id:
            raise Broken(seq, f"{where}: command_id differs from the message's other events")
        if "command_hash" in ev:
            command_hashes.add(ev["command_hash"])
            if len(command_hashes) > 1:
                raise Broken(seq, f"{where}: command_hash differs from the message's other events")
    chains.events += len(lines)

    for name in headers:
        if name == H_TRACEPARENT and is_written_traceparent(headers[name]):
            continue
        if name not in HEADERS:
            raise Broken(seq, f"header {name!r} is not allowed (section 2)")
    for name in HEADERS:
        if name not in headers:
            if name == H_COMMAND_HASH:
                continue  # absent reads as empty (section 2)
            raise Broken(seq, f"header {name} is missing")
        if not isinstance(headers[name], str):
            raise Broken(seq, f"header {name} is not a single string value")
    if headers[H_FORMAT] != "1":
        raise Broken(seq, f"header {H_FORMAT} is {headers[H_FORMAT]!r}, not '1'")
    if headers[H_MSG_ID] != command_id:
        raise Broken(seq, f"header {H_MSG_ID} is not the events' command_id")
    if headers[H_CHAIN_HEAD] != head.hex():
        raise Broken(seq, f"header {H_CHAIN_HEAD} is not the last event's hash")
    if command_hashes and headers.get(H_COMMAND_HASH, "") != next(iter(command_hashes)):
        raise Broken(seq, f"header {H_COMMAND_HASH} is not the events' command_hash")
    expected = headers[H_EXPECTED]
    previous = chains.last_seq.get(subject)
    if first_version == 1:
        if expected != "0":
            raise Broken(seq, f"header {H_EXPECTED} is {expected!r}, not '0' for a new aggregate")
    elif previous is not None:
        if expected != str(previous):
            raise Broken(seq, f"header {H_EXPECTED} is {expected!r}, the previous message "
                              f"on {subject} is {previous}")
    elif not DECIMAL.match(expected) or int(expected) >= seq:
        raise Broken(seq, f"header {H_EXPECTED} is {expected!r}, not a decimal smaller than {seq}")
    chains.last_seq[subject] = seq


# ---------------------------------------------------------------------------
# The whole verification (section 9, export case)


def verify(export_dir, ring=None, kept=None, allow_unsigned=False):
    """Returns (summary dict, line for a person); raises Broken or Unusable."""
    if not os.path.isdir(export_dir):
        raise Unusable(f"{export_dir} is not a directory")
    path = lambda name: os.path.join(export_dir, name)   # noqa: E731

    # Step 1: manifest (and manifest.sig when a ring is given).
    try:
        with open(path(MANIFEST_FILE), "rb") as f:
            raw_manifest = f.read()
    except OSError as e:
        raise Unusable(f"cannot read {MANIFEST_FILE}: {e.strerror or e}")
    manifest = parse_manifest(raw_manifest)
    sig_raw = None
    if os.path.exists(path(MANIFEST_SIG_FILE)):
        try:
            with open(path(MANIFEST_SIG_FILE), "rb") as f:
                sig_raw = f.read()
        except OSError as e:
            raise Unusable(f"cannot read {MANIFEST_SIG_FILE}: {e.strerror or e}")
    if sig_raw is None:
        manifest_word = "unsigned"
    elif ring is None:
        manifest_word = NO_RING
    else:
        manifest_word = "signed by " + check_manifest_sig(raw_manifest, sig_raw, ring)

    from_seq, to_seq = manifest["from_seq"], manifest["to_seq"]
    flt = manifest["filter"]

    # Checkpoints are read whole (they are few), grouped by seq.
    checkpoints = {}
    present = 0
    for lineno, cp in read_jsonl(path(CHECKPOINTS_FILE), CHECKPOINTS_FILE):
        if not is_int(cp.get("seq")):
            raise Unusable(f"{CHECKPOINTS_FILE} line {lineno}: seq is not an integer")
        checkpoints.setdefault(cp["seq"], []).append(cp)
        present += 1

    for name in (INDEX_FILE, MESSAGES_FILE):
        if not os.path.isfile(path(name)):
            raise Unusable(f"{name} is missing")
    messages = read_jsonl(path(MESSAGES_FILE), MESSAGES_FILE)
    messages_read = 0

    def next_message():
        nonlocal messages_read
        for lineno, m in messages:
            for k, typ in (("seq", int), ("subject", str), ("headers", dict), ("body", str)):
                if k not in m or not isinstance(m[k], typ) or (typ is int and not is_int(m[k])):
                    raise Unusable(f"{MESSAGES_FILE} line {lineno}: {k} is missing or mistyped")
            messages_read += 1
            return m
        return None

    digest = bytes.fromhex(manifest["start_digest"])
    expected = from_seq
    index_lines = 0
    included_count = 0
    chains = Chains(genesis=(from_seq == 1))
    kept_seq, kept_hex = kept if kept else (None, None)
    kept_found = None
    verified = 0
    signed_up_to = signed_by = None

    for lineno, e in read_jsonl(path(INDEX_FILE), INDEX_FILE):
        # Step 2: index walk.
        for k, typ in (("seq", int), ("subject", str), ("body_sha256", str), ("included", bool)):
            if k not in e or not isinstance(e[k], typ) or (typ is int and not is_int(e[k])):
                raise Unusable(f"{INDEX_FILE} line {lineno}: {k} is missing or mistyped")
        if not HEX64.match(e["body_sha256"]):
            raise Unusable(f"{INDEX_FILE} line {lineno}: body_sha256 is not 64 lowercase hex digits")
        index_lines += 1
        if e["seq"] != expected:
            raise Broken(expected, f"message {expected} missing / out of order "
                                   f"(the index holds {e['seq']} there)")
        seq = expected
        expected += 1
        if seq > U64_MAX:
            raise Broken(seq, "sequence beyond u64")
        subject = e["subject"]
        subject_b = utf8(subject, f"{INDEX_FILE} line {lineno} subject")
        digest = fold(digest, seq, sha256(subject_b), bytes.fromhex(e["body_sha256"]))
        selected = filter_selects(flt, subject)
        if e["included"] != selected:
            raise Broken(seq, f"message {seq} on {subject} "
                              + ("hidden: the filter selects it but the index says not included"
                                 if selected else
                                 "added: the filter does not select it but the index says included"))
        if seq == kept_seq:
            kept_found = digest

        # Step 3: checkpoints at this seq.
        for cp in checkpoints.get(seq, ()):
            key_id = check_checkpoint(cp, seq, digest.hex(), ring)
            if key_id is not None:
                verified += 1
                if signed_up_to is None or seq > signed_up_to:
                    signed_up_to, signed_by = seq, key_id

        # Step 4: the message itself.
        if not e["included"]:
            continue
        included_count += 1
        msg = next_message()
        if msg is None or msg["seq"] != seq:
            raise Broken(seq, f"message {seq} missing / out of order in {MESSAGES_FILE}")
        if msg["subject"] != subject:
            raise Broken(seq, f"message {seq} altered: its subject does not match the index")
        body_b = utf8(msg["body"], f"{MESSAGES_FILE} seq {seq} body")
        if sha256(body_b).hex() != e["body_sha256"]:
            raise Broken(seq, f"message {seq} altered: SHA-256 of its body does not match the index")
        check_message(seq, msg, chains)

    last = expected - 1

    # Step 5: end.
    extra = next_message()
    if extra is not None:
        raise Broken(extra["seq"], f"{MESSAGES_FILE} holds a line after the last included "
                                   "message (inserted or out of order)")
    outside = sorted(s for s in checkpoints if s < from_seq or s > last or s > to_seq)
    if outside:
        s = outside[0]
        raise Broken(s, f"truncated: a checkpoint at {s} lies outside the verified "
                        f"sequences {from_seq}..{last} (manifest {from_seq}..{to_seq})")
    if last != to_seq:
        raise Broken(to_seq, f"the export ends at {last}, its manifest says to_seq {to_seq}")
    if digest.hex() != manifest["end_digest"]:
        raise Broken(to_seq, f"the digest at {to_seq} differs from the manifest's end_digest")
    for k, have in (("messages_in_range", index_lines), ("messages_included", messages_read),
                    ("events_included", chains.events)):
        if manifest[k] != have:
            raise Broken(to_seq, f"manifest says {k} {manifest[k]}, the export holds {have}")
    if kept is not None:
        if kept_found is None or not (from_seq <= kept_seq <= to_seq):
            raise Broken(kept_seq, f"the kept digest {kept_seq}:{kept_hex} is not met inside "
                                   f"the range {from_seq}..{to_seq}")
        if kept_found.hex() != kept_hex:
            raise Broken(kept_seq, f"history no longer contains the kept digest: D_{kept_seq} is "
                                   f"{kept_found.hex()}, not {kept_hex}")

    # Step 6: coverage, failing closed.
    covered = from_seq - 1
    if signed_up_to is not None:
        covered = max(covered, signed_up_to)
    if kept is not None:
        covered = max(covered, kept_seq)
    unsigned_from = covered + 1 if covered < to_seq else None
    uncovered = None
    if unsigned_from is not None:
        uncovered = f"messages {unsigned_from}..{to_seq} are covered by no valid signature"
        if not allow_unsigned:
            raise Broken(unsigned_from, uncovered)
    if not manifest_word.startswith("signed by ") and not allow_unsigned:
        why = ("the export has no manifest.sig" if sig_raw is None
               else "manifest.sig was not checked (no key ring given)")
        raise Broken(0, f"{why}: its range and filter are vouched for by no checked signature")

    summary = {
        "ok": True,
        "stream": manifest["stream"],
        "from_seq": from_seq,
        "to_seq": to_seq,
        "messages": index_lines,
        "events": chains.events,
        "aggregates": len(chains.heads),
        "digest": f"{to_seq}:{digest.hex()}",
        "checkpoints_present": present,
        "checkpoints_verified": verified,
        "signatures": "checked" if ring is not None else NO_RING,
        "signed_up_to": signed_up_to,
        "signed_by": signed_by,
        "unsigned_from": unsigned_from,
        "manifest": manifest_word,
    }
    return summary, person_line(summary, kept, uncovered, ring)


def person_line(s, kept, uncovered, ring):
    to = s["to_seq"]
    parts = []
    if s["from_seq"] > to:
        head = "intact (the export holds no messages)"
    elif s["signed_up_to"] is not None:
        head = (f"intact and signed up to {fmt_int(s['signed_up_to'])} of {fmt_int(to)} "
                f"by key {s['signed_by']}")
    else:
        head = "intact"
        if ring is None:
            parts.append("checkpoint signatures not checked: no key ring given")
    if kept is not None:
        parts.append(f"the kept digest at {fmt_int(kept[0])} matches")
    if uncovered is not None:
        parts.append(f"UNSIGNED: {uncovered} (accepted with --allow-unsigned)")
    if s["manifest"] == "unsigned":
        parts.append("UNSIGNED: no manifest.sig vouches for the range and filter "
                     "(accepted with --allow-unsigned)")
    elif s["manifest"] == NO_RING:
        parts.append("manifest signature not checked: no key ring given")
    else:
        parts.append(f"manifest {s['manifest']}")
    return head + ("; " + "; ".join(parts) if parts else "")


# ---------------------------------------------------------------------------
# Self-test


def _hexeq(name, got, want):
    if got != want:
        raise AssertionError(f"{name}: got {got}, want {want}")
    print(f"ok   {name}", file=sys.stderr)


def _write_export(d, seed, key_id, commits, *, from_seq=1, flt=None,
                  checkpoint_at=None, sign_manifest=True, v1_secret=None):
    """A small, valid export for the self-test.  commits: list of (aggregate
    type, id, [data dicts]); one message each, seqs 1..len(commits)."""
    flt = flt or {"aggregate_type": None, "aggregate_id": None, "from_seq": None, "to_seq": None}
    heads, last_seq, msgs, index = {}, {}, [], []
    digest = ZERO32
    start_digest = None
    events_included = 0
    digests = {}
    for n, (at, aid, datas) in enumerate(commits, 1):
        subject = f"flow.ev.{at}.{aid}"
        cid = f"cmd-{n}"
        chash = sha256(cid.encode()).hex()
        ver, h = heads.get(subject, (0, ZERO32))
        first_ver = ver + 1
        lines = []
        for data in datas:
            ver += 1
            ev = {"event_id": f"e{n}-{ver}", "aggregate_type": at, "aggregate_id": aid,
                  "aggregate_version": ver, "event_type": "Test", "schema_version": "1.0",
                  "occurred_at": "2026-11-23T12:00:00.000000Z", "actor": {"client_id": "t"},
                  "command_id": cid, "correlation_id": cid, "causation_id": cid,
                  "command_hash": chash, "prev_hash": h.hex(), "data": data}
            line = json.dumps(ev, separators=(",", ":"), ensure_ascii=False).encode()
            h = sha256(h + line)
            lines.append(line)
        heads[subject] = (ver, h)
        body = b"".join(l + b"\n" for l in lines)
        if n == from_seq:
            start_digest = digest
        digest = fold(digest, n, sha256(subject.encode()), sha256(body))
        digests[n] = digest
        prev_msg = last_seq.get(subject, 0)
        last_seq[subject] = n
        if n < from_seq:
            continue
        inc = filter_selects(flt, subject)
        index.append({"seq": n, "subject": subject, "body_sha256": sha256(body).hex(), "included": inc})
        if inc:
            events_included += len(lines)
            headers = {H_MSG_ID: cid, H_EXPECTED: str(0 if first_ver == 1 else prev_msg),
                       H_CHAIN_HEAD: h.hex(), H_COMMAND_HASH: chash, H_FORMAT: "1"}
            msgs.append({"seq": n, "subject": subject, "time": "2026-11-23T12:00:00Z",
                         "headers": headers, "body": body.decode()})
    to_seq = len(commits)
    if start_digest is None:
        start_digest = digest
    cps = []
    for s in (checkpoint_at if checkpoint_at is not None else [to_seq]):
        cp = {"format": CHECKPOINT_V2, "stream": "FLOW_EVENTS", "seq": s,
              "digest": digests[s].hex(), "created_at": "2026-11-23T12:00:00.000000Z",
              "key_id": key_id}
        if v1_secret is not None:
            cp["format"] = CHECKPOINT_V1
            cp["key_id"] = "k1"
            cp["mac"] = hmac.new(v1_secret, signing_input(cp), hashlib.sha256).hexdigest()
        else:
            cp["signature"] = _ed25519_sign(seed, signing_input(cp)).hex()
        cps.append(cp)
    manifest = {"format": EXPORT_FORMAT, "stream": "FLOW_EVENTS", "from_seq": from_seq,
                "to_seq": to_seq, "start_digest": start_digest.hex(), "end_digest": digest.hex(),
                "filter": flt, "created_at": "2026-11-23T12:00:00.000000Z",
                "messages_in_range": len(index), "messages_included": len(msgs),
                "events_included": events_included}
    raw = json.dumps(manifest).encode()
    with open(os.path.join(d, MANIFEST_FILE), "wb") as f:
        f.write(raw)
    if sign_manifest:
        sig = {"key_id": key_id, "signature": _ed25519_sign(seed, MANIFEST_SIG_PREFIX + raw).hex()}
        with open(os.path.join(d, MANIFEST_SIG_FILE), "w") as f:
            json.dump(sig, f)
    for name, rows in ((INDEX_FILE, index), (MESSAGES_FILE, msgs), (CHECKPOINTS_FILE, cps)):
        with open(os.path.join(d, name), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _edit_line(d, name, lineno, fn):
    p = os.path.join(d, name)
    with open(p, encoding="utf-8", newline="") as f:
        text = f.read()
    lines = text.split("\n")   # never splitlines(): U+2028 is not a line end here
    lines[lineno] = fn(lines[lineno])
    with open(p, "w", encoding="utf-8", newline="") as f:
        f.write("\n".join(lines))


def self_test():
    # Section 4: D1.
    d1 = fold(ZERO32, 1, sha256(b"flow.ev.job.j1"), sha256(b'{"a":1}\n'))
    _hexeq("section 4 D1", d1.hex(),
           "53a64cc31147e5bffc69bc712e9842224acd158dea32383f29c8dd3fb1d24455")
    # Section 3: the event {"a":1} after h0.
    _hexeq("section 3 event hash", sha256(ZERO32 + b'{"a":1}').hex(),
           "b06a229070741292512e8760f470dd7a4c46ccfdf253df781d88dabe58c1ccb1")
    # RFC 8032 section 7.1, test 1.
    sk = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    pk = _ed25519_public(sk)
    rfc_sig = ("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
               "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")
    _hexeq("RFC 8032 test 1 public key", pk.hex(),
           "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    _hexeq("RFC 8032 test 1 signature", _ed25519_sign(sk, b"").hex(), rfc_sig)
    assert ed25519_verify(pk, b"", bytes.fromhex(rfc_sig)), "RFC 8032 test 1 verifies"
    bad = bytearray(bytes.fromhex(rfc_sig))
    bad[0] ^= 1
    assert not ed25519_verify(pk, b"", bytes(bad)), "a flipped bit fails"
    assert not ed25519_verify(pk, b"x", bytes.fromhex(rfc_sig)), "another message fails"
    print("ok   RFC 8032 test 1 verifies, altered signature/message do not", file=sys.stderr)

    # Section 5 vectors.
    fields = {"stream": "FLOW_EVENTS", "seq": 1,
              "digest": "53a64cc31147e5bffc69bc712e9842224acd158dea32383f29c8dd3fb1d24455",
              "created_at": "2026-11-23T12:00:00.000000Z"}
    v1 = dict(fields, format=CHECKPOINT_V1, key_id="k1")
    _hexeq("section 5 v1 mac",
           hmac.new(b"\xab" * 32, signing_input(v1), hashlib.sha256).hexdigest(),
           "675c28821565a02d04b10493581533f2caeb98db714e0bf96c3b5fb92a0d4fee")
    seed = b"\xab" * 32
    v2 = dict(fields, format=CHECKPOINT_V2, key_id="k2")
    pub2 = _ed25519_public(seed)
    sig2 = _ed25519_sign(seed, signing_input(v2))
    assert ed25519_verify(pub2, signing_input(v2), sig2)
    print(f"ok   section 5 v2 (computed here): PUBKEY_V2 = {pub2.hex()}", file=sys.stderr)
    print(f"                                   SIG_V2    = {sig2.hex()}", file=sys.stderr)

    # End to end on small exports.
    ring = {"k2": ("ed25519", pub2), "k1": ("hmac-sha256", b"\xab" * 32)}
    commits = [("job", "j1", [{"x": 1}, {"x": 2}]), ("job", "j2", [{"y": "test"}]),
               ("approval", "j1", [{"z": 1}]), ("job", "j1", [{"x": 3}]),
               ("job", "j2", [{"y": 4}, {"y": 5}, {"y": 6}])]
    cases = []

    def case(name, want, tamper=None, ring_=ring, kept=None, allow=False, **kw):
        cases.append((name, want, tamper, ring_, kept, allow, kw))

    case("intact", (True, 5))
    case("intact, filter job:j2 from seq 2", (True, 5),
         flt={"aggregate_type": "job", "aggregate_id": "j2", "from_seq": 2, "to_seq": None},
         from_seq=2)
    case("intact, v1 checkpoint", (True, 5), v1_secret=b"\xab" * 32)
    case("body altered", (False, 2),
         lambda d: _edit_line(d, MESSAGES_FILE, 1, lambda l: l.replace("test", "tset")))
    case("index line dropped", (False, 3),
         lambda d: _edit_line(d, INDEX_FILE, 2, lambda l: l.replace('"seq": 3', '"seq": 4')))
    case("included flipped (hidden)", (False, 3),
         lambda d: _edit_line(d, INDEX_FILE, 2, lambda l: l.replace("true", "false")))
    case("checkpoint signature altered", (False, 5),
         lambda d: _edit_line(d, CHECKPOINTS_FILE, 0,
                              lambda l: re.sub(r'"signature": "(.)', lambda m: '"signature": "'
                                               + ("1" if m.group(1) == "0" else "0"), l)))
    case("no ring, unsigned refused", (False, 1), ring_=None)
    case("no ring, kept digest: the manifest is not vouched for", (False, 0), ring_=None, kept="keep")
    case("no ring, kept digest, --allow-unsigned", (True, 5), ring_=None, kept="keep", allow=True)
    case("no ring, --allow-unsigned", (True, 5), ring_=None, allow=True)
    case("early checkpoint, tail uncovered", (False, 4), checkpoint_at=[3])
    case("no manifest.sig", (False, 0), sign_manifest=False)
    case("manifest altered", (False, 0),
         lambda d: _edit_line(d, MANIFEST_FILE, 0, lambda l: l.replace('"created_at": "2026',
                                                                       '"created_at": "2027')))
    case("header added", (False, 4),
         lambda d: _edit_line(d, MESSAGES_FILE, 3,
                              lambda l: l.replace('"headers": {', '"headers": {"X-Extra": "1", ')))
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, want, tamper, ring_, kept, allow, kw) in enumerate(cases):
            d = os.path.join(tmp, str(i))
            os.mkdir(d)
            _write_export(d, seed, "k2", commits, **kw)
            if tamper:
                tamper(d)
            kept_arg = None
            if kept == "keep":
                with open(os.path.join(d, MANIFEST_FILE)) as f:
                    kept_arg = (5, json.load(f)["end_digest"])
            try:
                summary, _ = verify(d, ring_, kept_arg, allow)
                got = (True, summary["to_seq"])
            except Broken as b:
                got = (False, b.seq)
            if got != want:
                raise AssertionError(f"export case {name!r}: got {got}, want {want}")
            print(f"ok   export: {name} -> {got}", file=sys.stderr)
    print("self-test passed", file=sys.stderr)


# ---------------------------------------------------------------------------
# CLI

DESCRIPTION = """\
Verify a flowledger export directory (written by `flowledger audit export`)
independently of flowledger, from docs/EVENTS.md sections 2-5, 8 and 9.

Checked, in this order (the first failure ends verification):
  1. manifest.json is a flowledger-export-v2 manifest (else seq 0); with
     --keys, manifest.sig must be signed by an ed25519 key of the ring
     (else seq 0).
  2. index.jsonl holds seqs from_seq, from_seq+1, ... in order; the stream
     digest is folded from start_digest; each entry's "included" must be
     the filter's verdict on its subject (hidden / added).
  3. each checkpoint in checkpoints.jsonl, when the walk reaches its seq:
     its digest equals the running digest; with --keys its Ed25519 (v2) or
     HMAC-SHA256 (v1) signature verifies with the ring's key of its key_id.
  4. each included message is the next line of messages.jsonl, matches the
     index, and its events chain per aggregate (versions, prev_hash, hash
     of the exact stored line); its headers are exactly the five of
     section 2 and agree with the events.
  5. nothing is left over: no extra message lines, no checkpoint outside
     the range (truncated); the end seq, end_digest and counts equal the
     manifest's; a --digest SEQ:HEX must be met and equal D_SEQ.
  6. coverage, failing closed: valid checkpoint signatures (or the kept
     digest) must cover up to to_seq, and manifest.sig must exist, unless
     --allow-unsigned.

Output: one line of JSON on stdout, {"ok": false, "seq": S, "reason": ...}
when broken or the summary object when intact, and one line for a person
on stderr."""

EPILOG = """\
exit codes:
  0  intact
  1  broken: a history, signature or coverage failure (the JSON names the
     stream sequence, or 0 for the manifest as a whole)
  2  usage error, or an unreadable or malformed export or key-ring file
     (a file missing, a line that is not JSON, ...): no verdict

The key ring is taken from --keys only (FLOWLEDGER_CHECKPOINT_KEYS is not
read, so that a run depends on its arguments alone).  Ring format:
{"keys": [{"key_id": ID, "algorithm": "ed25519", "public_key": HEX64} |
{"key_id": ID, "algorithm": "hmac-sha256", "secret": HEX (64 or more)}]}.

--self-test checks the test vectors of docs/EVENTS.md (sections 3, 4, 5)
and RFC 8032, prints the computed v2 checkpoint vector, and verifies a few
small generated exports."""


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="verify_export.py", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", nargs="?", metavar="EXPORT_DIR",
                        help="directory written by `flowledger audit export`")
    parser.add_argument("--keys", metavar="RING.json",
                        help="key ring (section 5); without it signatures are not checked "
                             "and cover nothing")
    parser.add_argument("--digest", metavar="SEQ:HEX",
                        help="a digest kept earlier: D_SEQ must equal HEX; it covers up to SEQ")
    parser.add_argument("--allow-unsigned", action="store_true",
                        help="accept messages covered by no valid signature and a missing "
                             "manifest.sig; the summary says what is unsigned")
    parser.add_argument("--self-test", action="store_true",
                        help="check the specification's and RFC 8032's test vectors and exit")
    args = parser.parse_args(argv)

    if args.self_test:
        try:
            self_test()
        except AssertionError as e:
            print(f"self-test FAILED: {e}", file=sys.stderr)
            return 1
        return 0
    if args.export_dir is None:
        parser.error("EXPORT_DIR is required (or --self-test)")

    try:
        ring = load_ring(args.keys) if args.keys is not None else None
        kept = parse_digest_arg(args.digest) if args.digest is not None else None
        summary, line = verify(args.export_dir, ring, kept, args.allow_unsigned)
    except Unusable as e:
        print(f"verify_export.py: error: {e}", file=sys.stderr)
        return 2
    except Broken as b:
        print(json.dumps({"ok": False, "seq": b.seq, "reason": b.reason}))
        # control characters escaped: an export cannot rewrite this line
        shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in b.reason)
        print(f"broken at {fmt_int(b.seq)}: {shown}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
