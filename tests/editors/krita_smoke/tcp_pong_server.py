"""Tiny TCP server for the host side: answers one line `X` with `pong:X`.

    python3 tcp_pong_server.py PORTFILE   # binds 127.0.0.1:0, writes the port to PORTFILE
"""
import socketserver
import sys


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline().strip()
        self.wfile.write(b"pong:" + line + b"\n")


if __name__ == "__main__":
    with socketserver.TCPServer(("127.0.0.1", 0), Handler) as srv:
        with open(sys.argv[1] + ".tmp", "w") as f:
            f.write(str(srv.server_address[1]))
        import os
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
        srv.serve_forever()
