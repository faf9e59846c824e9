"""Tiny HTTP server on 127.0.0.1 (host side) serving raw RGBA u8 pixels.
GET /pixels?w=W&h=H -> r = 7*x, g = 11*y, b = 200, a = 255. Writes its port to argv[1]."""
import http.server
import sys
import urllib.parse


def server_pattern(w, h):
    return bytes(v for y in range(h) for x in range(w) for v in ((7 * x) % 256, (11 * y) % 256, 200, 255))


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        body = server_pattern(int(q['w'][0]), int(q['h'][0]))
        self.send_response(200)
        self.send_header('Content-Type', 'application/octet-stream')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        sys.stderr.write('pixel_server: served %s from %s\n' % (self.path, self.client_address[0]))

    def log_message(self, *a):
        pass


if __name__ == '__main__':
    srv = http.server.HTTPServer(('127.0.0.1', 0), Handler)
    with open(sys.argv[1] + '.tmp', 'w') as f:
        f.write(str(srv.server_address[1]))
    import os
    os.replace(sys.argv[1] + '.tmp', sys.argv[1])
    srv.serve_forever()
