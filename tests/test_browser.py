"""A hostile web page in a real browser (headless Chromium) tries to drive the server.

The page is served from another local port, as a malicious site or a compromised local
web app would be; it opens ``new WebSocket("ws://127.0.0.1:PORT")`` without a token,
with a guessed one and even with the right one, and tries to queue a job. Browsers
always send ``Origin`` on websocket handshakes, so every attempt must be refused at
the handshake and nothing may be queued, also when the server was started for LAN use.
A DNS-rebinding variant maps a foreign host name to 127.0.0.1 inside the browser.
"""

import http.server
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CONTROLCANVAS_REQUIRE_BROWSER"),
    reason="Chromium is not installed (CI installs the Debian package 'chromium')")

PAGE = """<!doctype html><html><body><pre id="out">pending</pre><script>
const WS_URL = %(ws_url)s, TOKEN = %(token)s;
const results = {};
function attempt(name, token) {
  return new Promise(resolve => {
    const r = {opened: false, messages: []};
    let ws;
    try { ws = new WebSocket(WS_URL); } catch (e) { r.thrown = String(e); results[name] = r;
                                                   resolve(); return; }
    ws.onopen = () => {
      r.opened = true;
      ws.send(JSON.stringify({type: "hello", protocol: 1, token: token}));
      ws.send(JSON.stringify({type: "generate", job_id: "%(job)s",
                              request: {width: 64, height: 64, steps: 2}}));
    };
    ws.onmessage = e => r.messages.push(String(e.data).slice(0, 100));
    ws.onclose = e => { r.code = e.code; results[name] = r; resolve(); };
    setTimeout(() => { r.timeout = true; results[name] = r; resolve(); }, 4000);
  });
}
Promise.all([attempt("no_token", ""), attempt("guessed_token", "0123456789"),
             attempt("stolen_token", TOKEN)]).then(() => {
  const text = JSON.stringify(results);
  document.getElementById("out").textContent = text;
  fetch("/report", {method: "POST", body: text});
});
</script></body></html>"""


class _Page(http.server.BaseHTTPRequestHandler):
    page = b""
    reports: list = []

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(self.page)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).reports.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def run_page_in_chromium(server, page_host="127.0.0.1", ws_host="127.0.0.1", rules=None):
    job = "e" * 32
    port = server.url.rsplit(":", 1)[1]
    handler = type("Page", (_Page,), {"reports": []})
    handler.page = (PAGE % {"ws_url": json.dumps(f"ws://{ws_host}:{port}"),
                            "token": json.dumps(server.token), "job": job}).encode()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    profile = tempfile.mkdtemp()
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=15000",
            "--dump-dom", f"http://{page_host}:{httpd.server_address[1]}/page.html"]
    if rules:
        args.insert(1, f"--host-resolver-rules={rules}")
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=120)
        deadline = time.monotonic() + 20
        while not handler.reports and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        httpd.shutdown()
        shutil.rmtree(profile, ignore_errors=True)
    assert handler.reports, f"the page never reported; chromium said: {out.stderr[-800:]}"
    return handler.reports[0], job


def assert_refused(results, server, job):
    assert set(results) == {"no_token", "guessed_token", "stolen_token"}
    for name, r in results.items():
        assert not r["opened"], f"{name}: the browser got a websocket open: {r}"
        assert r["messages"] == [], name
    assert server.call(lambda: job in server.server.manager.jobs) is False
    assert server.call(lambda: len(server.server.manager.jobs)) == 0


def test_hostile_page_is_refused_even_with_the_token(fake_server, caplog):
    caplog.set_level("WARNING", logger="backend.server.websocket")
    results, job = run_page_in_chromium(fake_server)
    assert_refused(results, fake_server, job)
    refusals = [r for r in caplog.records if "Origin" in r.getMessage()]
    assert len(refusals) >= 3  # each handshake was seen and refused for its Origin


def test_hostile_page_is_refused_by_a_lan_server_too(make_server):
    server = make_server(allow_remote=True)
    results, job = run_page_in_chromium(server)
    assert_refused(results, server, job)


def test_dns_rebinding_page_is_refused(fake_server):
    """evil.test resolves to 127.0.0.1 (as after a rebinding attack): the page and the
    socket both use that name, so Origin and Host are both foreign."""
    results, job = run_page_in_chromium(fake_server, page_host="evil.test",
                                        ws_host="evil.test",
                                        rules="MAP evil.test 127.0.0.1")
    assert_refused(results, fake_server, job)
