#!/usr/bin/env python3
"""A stand-in peer for the demo and the README (stdlib only): every POST
answers after 200 ms with {"step": ..., "echo": inputs}, as a solver
service or a synchronous n8n webhook would.

  demo-peer.py PORT_FILE        binds a free port and writes it to PORT_FILE
  demo-peer.py --listen 9101 --listen 9102 ...
                                binds each port given (the README's workflows)
"""
import json, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Peer(BaseHTTPRequestHandler):
    def do_POST(self):
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        except ValueError:
            body = {}
        time.sleep(0.2)
        out = json.dumps({"step": body.get("step"), "echo": body.get("inputs")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass

def main(argv):
    if len(argv) >= 2 and argv[0] == "--listen":
        ports = [int(p) for flag, p in zip(argv[::2], argv[1::2]) if flag == "--listen"]
        servers = [ThreadingHTTPServer(("127.0.0.1", p), Peer) for p in ports]
        for s in servers[1:]:
            threading.Thread(target=s.serve_forever, daemon=True).start()
        print("demo-peer: listening on " + ", ".join(f"127.0.0.1:{p}" for p in ports), file=sys.stderr)
        servers[0].serve_forever()
    elif len(argv) == 1:
        server = ThreadingHTTPServer(("127.0.0.1", 0), Peer)
        with open(argv[0], "w") as f:
            f.write(str(server.server_address[1]))
        server.serve_forever()
    else:
        sys.exit(__doc__)

main(sys.argv[1:])
