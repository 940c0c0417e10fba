#!/usr/bin/env python3
"""A stand-in solver service for the demo (stdlib only): POST answers
after `delay_ms` (default 200) with {"step": ..., "echo": inputs}. It binds a
free port and writes it to the file named by its first argument."""
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Solver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        time.sleep(0.2)
        out = json.dumps({"step": body.get("step"), "echo": body.get("inputs")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Solver)
with open(sys.argv[1], "w") as f:
    f.write(str(server.server_address[1]))
server.serve_forever()
