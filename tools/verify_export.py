#!/usr/bin/env python3
"""Independent verifier for a flowledger export, written from docs/EVENTS.md
alone (standard library only). It shares no code with the Rust verifier.

usage: verify_export.py EXPORT_DIR [--key-hex HEX --key-id ID]
exit 0 when intact; exit 1 printing "broken at SEQ: reason" otherwise.
"""
import hashlib
import hmac
import json
import os
import sys

ZERO = bytes(32)


def sha(b):
    return hashlib.sha256(b).digest()


def fail(seq, reason):
    print(f"broken at {seq}: {reason}")
    sys.exit(1)


def main():
    args = sys.argv[1:]
    if not args:
        print(__doc__)
        sys.exit(2)
    d = args[0]
    key = key_id = None
    if "--key-hex" in args:
        key = bytes.fromhex(args[args.index("--key-hex") + 1])
        key_id = args[args.index("--key-id") + 1]
    manifest = json.load(open(os.path.join(d, "manifest.json")))
    assert manifest["format"] == "flowledger-export-v1"
    checkpoints = {}
    for line in open(os.path.join(d, "checkpoints.jsonl")):
        cp = json.loads(line)
        checkpoints.setdefault(cp["seq"], []).append(cp)
    messages = iter(open(os.path.join(d, "messages.jsonl")).read().splitlines())
    digest = bytes.fromhex(manifest["start_digest"])
    seq = manifest["from_seq"] - 1
    heads = {}
    complete = manifest["chain_complete"]
    signed_up_to = None
    for line in open(os.path.join(d, "index.jsonl")):
        e = json.loads(line)
        if e["seq"] != seq + 1:
            fail(seq + 1, "missing or out of order")
        seq = e["seq"]
        digest = sha(digest + seq.to_bytes(8, "big") + bytes.fromhex(e["subject_sha256"]) + bytes.fromhex(e["body_sha256"]))
        for cp in checkpoints.pop(seq, []):
            if cp["digest"] != digest.hex():
                fail(seq, "digest differs from checkpoint")
            if key is not None and cp["key_id"] == key_id:
                signing_input = "".join(f"{cp[k]}\n" for k in ["format", "stream", "seq", "digest", "created_at", "key_id"])
                mac = hmac.new(key, signing_input.encode(), hashlib.sha256).hexdigest()
                if not hmac.compare_digest(mac, cp["mac"]):
                    fail(seq, "bad checkpoint signature")
                signed_up_to = seq
        if not e["included"]:
            continue
        m = json.loads(next(messages, "null") or "null")
        if m is None or m["seq"] != seq:
            fail(seq, "message missing or out of order")
        body = m["body"].encode()
        if sha(m["subject"].encode()).hex() != e["subject_sha256"] or sha(body).hex() != e["body_sha256"]:
            fail(seq, "message differs from index")
        assert body.endswith(b"\n")
        last = None
        for ln in body[:-1].split(b"\n"):
            ev = json.loads(ln)
            subject = f"flow.ev.{ev['aggregate_type']}.{ev['aggregate_id']}"
            if subject != m["subject"]:
                fail(seq, "event under the wrong subject")
            prev = bytes.fromhex(ev["prev_hash"])
            if subject in heads:
                v, h = heads[subject]
                if ev["aggregate_version"] == v + 1 and prev != h:
                    fail(seq, "chain broken")
                if ev["aggregate_version"] != v + 1 and complete:
                    fail(seq, "version gap")
            elif complete and manifest["from_seq"] == 1 and (ev["aggregate_version"] != 1 or prev != ZERO):
                fail(seq, "chain does not start at genesis")
            last = sha(prev + ln)
            heads[subject] = (ev["aggregate_version"], last)
        if m["headers"].get("Flowledger-Chain-Head") != last.hex():
            fail(seq, "chain head header differs")
    if next(messages, None) is not None:
        fail(seq, "extra message")
    for s in checkpoints:
        if s > seq:
            fail(s, "checkpoint beyond the end (truncated)")
    if seq != manifest["to_seq"] or digest.hex() != manifest["end_digest"]:
        fail(seq, "end differs from manifest")
    print(json.dumps({"ok": True, "to_seq": seq, "digest": f"{seq}:{digest.hex()}", "signed_up_to": signed_up_to}))


if __name__ == "__main__":
    main()
