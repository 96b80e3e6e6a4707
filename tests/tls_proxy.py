"""A browser's client certificate, for the dashboard's browser tests.

Headless Chromium offers no client certificate without a managed policy and an NSS
database written into the machine's configuration, which a test must not touch. So
the tests put the certificate where a person's browser would hold it, one hop before
the coordinator: this proxy listens on loopback in plain HTTP and forwards each
request to the real coordinator over mutual TLS with the certificate it was given,
streaming the answer back (server-sent events included). The coordinator still checks
every request's certificate itself; the proxy only carries it.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

PASSED_HEADERS = (
    "content-type",
    "cache-control",
    "content-security-policy",
    "x-content-type-options",
)


@contextmanager
def certificate_proxy(upstream: str, context: ssl.SSLContext) -> Iterator[str]:
    """A loopback URL that reaches ``upstream`` with ``context``'s client certificate."""
    client = httpx.Client(base_url=upstream, verify=context, timeout=httpx.Timeout(30, read=None))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the body ends when the connection closes

        def do_GET(self) -> None:
            try:
                with client.stream("GET", self.path) as answer:
                    self.send_response(answer.status_code)
                    for name in PASSED_HEADERS:
                        if name in answer.headers:
                            self.send_header(name, answer.headers[name])
                    self.end_headers()
                    for chunk in answer.iter_raw():
                        self.wfile.write(chunk)
                        self.wfile.flush()
            except (httpx.HTTPError, OSError):
                return  # the browser went away, or the coordinator stopped

        def log_message(self, *_: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        client.close()
