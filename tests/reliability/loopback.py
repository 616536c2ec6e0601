"""Small HTTP servers on loopback that misbehave the way real networks do, for the remote-read tests.

- `Gateway`: a reverse proxy in front of an S3 server (moto) that answers the first `failures` requests
  with an HTML 503 page, as an ingress or load balancer in front of MinIO does while its backend restarts,
  then forwards every request unchanged (the Host header too, so S3 signatures still hold); with
  `trickle_suffix` set, it sends the bodies of GETs of such keys a byte at a time.
- `Trickler`: serves a body one byte every `interval` seconds (with an honest Content-Length), and answers
  HEAD the same slow way: a server that is alive but never finishes.
"""

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HTML_503 = (b"<html><head><title>503 Service Temporarily Unavailable</title></head><body><center>"
            b"<h1>503 Service Temporarily Unavailable</h1></center><hr><center>nginx</center></body></html>")


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 in a daemon thread; `url` is its base URL."""

    def __init__(self, handler):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _GatewayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _handle(self) -> None:
        gateway: Gateway = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        with gateway.lock:
            gateway.requests += 1
            fail = gateway.failed < gateway.failures
            gateway.failed += fail
        if fail:
            self.send_response(gateway.status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(HTML_503)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(HTML_503)
            return
        upstream = http.client.HTTPConnection(gateway.upstream_host, gateway.upstream_port, timeout=30)
        try:
            upstream.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
            response = upstream.getresponse()
            data = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                if gateway.trickle_suffix and self.command == "GET" and self.path.split("?")[0].endswith(
                        gateway.trickle_suffix):
                    for byte in data:  # alive, but never done
                        if gateway.stopped.wait(gateway.interval):
                            return
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                else:
                    self.wfile.write(data)
        finally:
            upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class Gateway(_Server):
    """HTML 503 for the first `failures` requests, then a transparent proxy to upstream (http://host:port)."""

    def __init__(self, upstream: str, failures: int):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream_host, self.upstream_port = host, int(port)
        self.failures, self.failed, self.requests = failures, 0, 0
        self.status = 503  # of the HTML error page
        self.trickle_suffix, self.interval = "", 0.5  # GETs of keys ending so: the body a byte every interval s
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        super().__init__(_GatewayHandler)

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        super().__exit__(*exc)


class _TrickleHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _trickle(self, send_body: bool) -> None:
        trickler: Trickler = self.server.owner
        trickler.requests += 1
        try:
            if not send_body:  # HEAD: even the status line comes a byte at a time
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
                    if trickler.stopped.wait(trickler.interval):
                        return
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-tar")
            self.send_header("Content-Length", str(len(trickler.body)))
            self.end_headers()
            self.wfile.flush()
            for byte in trickler.body:
                if trickler.stopped.wait(trickler.interval):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up: what the tests want
            return

    def do_GET(self) -> None:
        self._trickle(send_body=True)

    def do_HEAD(self) -> None:
        self._trickle(send_body=False)


class Trickler(_Server):
    """A server that sends `body` (and its HEAD answer) one byte every `interval` seconds."""

    def __init__(self, body: bytes = b"\0" * 10_240, interval: float = 0.5):
        self.body, self.interval, self.requests = body, interval, 0
        self.stopped = threading.Event()
        super().__init__(_TrickleHandler)

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        super().__exit__(*exc)
