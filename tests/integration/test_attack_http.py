"""Outbound HTTP from guest modules: only the step's allowed_hosts, on every hop.

Issue 11, class 2: Extism's HTTP checked ``allowed_hosts`` only on the first URL
and followed a redirect from an allowed host to a private address (the NATS
monitor port). Deadlift now gives Extism an empty allow-list and offers its own
``http_request`` host function (deadlift/runtime/http.py). The first half of this file
runs the real ``fetcher`` module through a real worker on a real nats-server;
the second half makes requests directly, to test HTTP servers on 127.0.0.1 and
with an injected resolver. What is refused before any connection (the
allow-list, address classes, malformed requests) is in tests/unit/test_http_policy.py.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

import deadlift.runtime.http
from deadlift.bus import dlq
from deadlift.errors import ConfigError, HostFunctionError
from deadlift.ops.server import EmbeddedServer
from deadlift.runtime.builtins import HTTP_SERVICE
from deadlift.runtime.http import perform
from deadlift.runtime.http_policy import HttpPolicy, http_policy
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings
from deadlift.wasm.hostfns import HostCall, invoke
from tests.conftest import publish, stored
from tests.unit.fakes import resolving

MiB = 1024 * 1024

# -- test HTTP servers (127.0.0.1 only, stopped by the fixture) --------------------

Route = Callable[["_Handler", bytes], None]


@dataclass
class Seen:
    """One request a test server received."""

    method: str
    path: str
    host: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Web:
    """A running test server: its port, base URL and the requests it received."""

    port: int
    base: str
    seen: list[Seen] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def _serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.split("?", 1)[0]
        self.server.web.seen.append(
            Seen(self.command, self.path, self.headers.get("Host", ""), dict(self.headers), body)
        )
        route = self.server.routes.get(path)
        if route is None:
            prefix = next(
                (p for p in self.server.routes if p.endswith("/") and path.startswith(p)), ""
            )
            route = self.server.routes.get(prefix, not_found)
        # The client may give up early (what several tests want).
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError):
            route(self, body)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    web: Web
    routes: dict[str, Route]
    stop: threading.Event


def reply(
    handler: _Handler,
    status: int = 200,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    length: bool = True,
) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    if length:
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)


def not_found(handler: _Handler, body: bytes) -> None:
    reply(handler, 404, b"no such path")


def text(content: str) -> Route:
    return lambda h, b: reply(h, 200, content.encode(), {"Content-Type": "text/plain"})


def redirect(location: str, status: int = 302) -> Route:
    return lambda h, b: reply(h, status, b"", {"Location": location})


def echo(handler: _Handler, body: bytes) -> None:
    """Answers with what it received: method, Host, selected headers and body."""
    seen = {
        "method": handler.command,
        "host": handler.headers.get("Host"),
        "authorization": handler.headers.get("Authorization"),
        "x_test": handler.headers.get("X-Test"),
        "body": body.decode("latin-1"),
    }
    reply(handler, 200, json.dumps(seen).encode(), {"Content-Type": "application/json"})


def loop(handler: _Handler, body: bytes) -> None:
    """``/loop/N`` redirects to ``/loop/N-1``; ``/loop/0`` answers."""
    n = int(handler.path.rsplit("/", 1)[1])
    if n == 0:
        reply(handler, 200, b"end of the chain")
    else:
        reply(handler, 302, b"", {"Location": f"/loop/{n - 1}"})


def big(size: int, *, length: bool) -> Route:
    """``size`` bytes, with or without a Content-Length (then it ends at close)."""
    return lambda h, b: reply(h, 200, b"x" * size, length=length)


def slow_headers(seconds: float) -> Route:
    def route(handler: _Handler, body: bytes) -> None:
        handler.server.stop.wait(seconds)
        reply(handler, 200, b"too late")

    return route


def slow_loop(handler: _Handler, body: bytes) -> None:
    """``loop``, 0.2 s per hop."""
    handler.server.stop.wait(0.2)
    loop(handler, body)


def drip(handler: _Handler, body: bytes) -> None:
    """Headers at once, then one byte every 0.1 s (each read alone would be quick)."""
    handler.send_response(200)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    for _ in range(1000):
        if handler.server.stop.wait(0.1):
            return
        handler.wfile.write(b"x")
        handler.wfile.flush()


@pytest.fixture
def web() -> Iterator[Callable[..., Web]]:
    """Start HTTP(S) test servers on 127.0.0.1: ``web({"/path": route}, tls=ctx)``."""
    servers: list[tuple[_Server, threading.Thread]] = []
    stop = threading.Event()

    def start(routes: dict[str, Route], tls: ssl.SSLContext | None = None) -> Web:
        server = _Server(("127.0.0.1", 0), _Handler)
        port = server.server_address[1]
        server.web = Web(port, f"{'https' if tls else 'http'}://127.0.0.1:{port}")
        server.routes, server.stop = routes, stop
        if tls is not None:
            tls.sni_callback = lambda sock, name, ctx: server.web.sni.append(name)
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="test-http", daemon=True
        )
        thread.start()
        servers.append((server, thread))
        return server.web

    yield start
    stop.set()
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def get(url: str, policy: HttpPolicy, **fields: Any) -> dict[str, Any]:
    return perform(policy, {"url": url, **fields})


# -- through a real worker, with the real fetcher module ----------------------------


def fetch_workflow(
    name: str,
    allowed: list[str] | None,
    *,
    function: str = "fetch",
    grants: str = "[http_request]",
    timeout_ms: int = 5000,
) -> str:
    hosts = f"\n    allowed_hosts: {json.dumps(allowed)}" if allowed is not None else ""
    return f"""
name: {name}
org: acme
trigger: acme.{name}.in
steps:
  - name: get
    module: fetcher
    function: {function}
    host_functions: {grants}
    timeout_ms: {timeout_ms}
    publish: [acme.{name}.out]
    retry: {{max_attempts: 1}}{hosts}
"""


async def test_an_allowed_host_answers_the_module(
    nc: Client, settings: Settings, push: Any, apply: Any, web: Callable[..., Web]
) -> None:
    site = web({"/hello": text("hello from the test server"), "/echo": echo})
    await push("fetcher")
    await apply(fetch_workflow("fetch", [f"127.0.0.1:{site.port}"]))
    async with Worker(nc, settings=settings) as worker:
        await publish(nc, "acme.fetch.in", {"url": f"{site.base}/hello"})
        await publish(
            nc,
            "acme.fetch.in",
            {
                "url": f"{site.base}/echo",
                "method": "POST",
                "headers": {"X-Test": "1"},
                "body": "hi",
            },
        )
        await worker.drain()
    out = await stored(nc, "acme.fetch.out")
    assert len(out) == 2
    by_url = {e.data["url"]: e.data for e in out}
    hello, echoed = by_url[f"{site.base}/hello"], by_url[f"{site.base}/echo"]
    assert hello["status"] == 200
    assert hello["body"] == "hello from the test server"
    assert hello["headers"]["content-type"] == "text/plain"
    sent = json.loads(echoed["body"])
    assert sent == {
        "method": "POST",
        "host": f"127.0.0.1:{site.port}",
        "authorization": None,
        "x_test": "1",
        "body": "hi",
    }
    assert sorted(s.path for s in site.seen) == ["/echo", "/hello"]


@dataclass
class Attack:
    """A request the step must refuse: where it starts and what the dead letter says."""

    path: str
    error: str  # regex; {a} = the allowed server's port, {b} = the other's, {m} = NATS monitor
    allowed: list[str] = field(default_factory=lambda: ["127.0.0.1:{a}"])
    host: str = "127.0.0.1"
    timeout_ms: int = 5000


ATTACKS = {
    "redirect to the NATS monitor port": Attack(
        "/to-monitor",
        r"http_request: redirect to http://127\.0\.0\.1:{m}/varz refused: "
        r"127\.0\.0\.1:{m} is not in the step's allowed_hosts",
    ),
    "redirect to another loopback port": Attack(
        "/to-b",
        r"http_request: redirect to http://127\.0\.0\.1:{b}/secret refused: "
        r"127\.0\.0\.1:{b} is not in the step's allowed_hosts",
    ),
    "allowed name that resolves to loopback": Attack(
        "/hello",
        r"http_request: GET http://localhost:{a}/hello refused: localhost resolves to "
        r"(127\.0\.0\.1|::1), a loopback address, which is not in the step's allowed_hosts",
        allowed=["localhost:{a}"],
        host="localhost",
    ),
    "allowed name that resolves to the metadata address": Attack(
        "/hello",
        r"http_request: GET http://metadata\.example:{a}/hello refused: metadata\.example "
        r"resolves to 169\.254\.169\.254, a link-local \(cloud metadata\) address",
        allowed=["metadata.example:{a}"],
        host="metadata.example",
    ),
    "a step that lists no allowed_hosts": Attack(
        "/hello",
        r"^http_request: step 'get' lists no allowed_hosts, so it may not make HTTP requests$",
        allowed=[],
    ),
    "six redirects": Attack(
        "/loop/6",
        r"http_request: GET http://127\.0\.0\.1:{a}/loop/6 refused: more than 5 redirects",
    ),
    "response over 1 MiB": Attack("/big", r"http_request: response over 1048576 bytes"),
    "response slower than the step's timeout": Attack(
        "/slow",
        r"http_request: GET http://127\.0\.0\.1:{a}/slow got no complete response within 1\.5 s",
        timeout_ms=1500,
    ),
}


@pytest.mark.parametrize("attack", list(ATTACKS.values()), ids=list(ATTACKS))
async def test_a_refused_request_fails_the_step_and_reaches_nothing(
    nc: Client,
    settings: Settings,
    push: Any,
    apply: Any,
    web: Callable[..., Web],
    nats_server: EmbeddedServer,
    monkeypatch: pytest.MonkeyPatch,
    attack: Attack,
) -> None:
    other = web({"/secret": text("the other server's secret")})
    site = web(
        {
            "/hello": text("hello"),
            "/to-b": redirect(f"{other.base}/secret"),
            "/to-monitor": redirect(f"http://127.0.0.1:{nats_server.monitor_port}/varz"),
            "/loop/": loop,
            "/big": big(2 * MiB, length=False),
            "/slow": slow_headers(30),
        }
    )
    # The cloud metadata address, as a DNS answer an attacker controls would give it.
    real = deadlift.runtime.http.system_resolver
    monkeypatch.setattr(
        deadlift.runtime.http,
        "system_resolver",
        lambda host, port: ["169.254.169.254"] if host == "metadata.example" else real(host, port),
    )
    ports = {"a": site.port, "b": other.port, "m": nats_server.monitor_port}
    allowed = [entry.format(**ports) for entry in attack.allowed]
    await push("fetcher")
    await apply(fetch_workflow("attack", allowed, timeout_ms=attack.timeout_ms))
    async with Worker(nc, settings=settings) as worker:
        started = time.monotonic()
        await publish(
            nc, "acme.attack.in", {"url": f"http://{attack.host}:{site.port}{attack.path}"}
        )
        await worker.drain()
        took = time.monotonic() - started
    [letter] = await dlq.letters(nc.jetstream())
    assert letter.kind == "host_function", letter.error
    assert re.search(attack.error.format(**ports), letter.error), letter.error
    assert letter.error.startswith("http_request: ")  # the host's reason, not the module's
    assert await stored(nc, "acme.attack.out") == []  # nothing reached the next step
    assert other.seen == []  # nothing was asked of the second server
    assert took < 8  # refused promptly: the 30 s slow answer is cut at the step's 1.5 s


async def test_a_step_that_does_not_grant_http_request_cannot_request(
    nc: Client, push: Any, apply: Any, web: Callable[..., Web]
) -> None:
    site = web({"/hello": text("hello")})
    await push("fetcher")
    with pytest.raises(ConfigError, match=r"http_request"):
        await apply(fetch_workflow("nogrant", [f"127.0.0.1:{site.port}"], grants="[]"))
    # And a call that reaches the host function without the grant is refused there too.
    call = HostCall(
        org="acme", workflow="nogrant", step="get", run="r", event_id="e", granted={},
        services={HTTP_SERVICE: http_policy([f"127.0.0.1:{site.port}"])},
    )  # fmt: skip
    answer = json.loads(invoke(call, "http_request", json.dumps({"url": site.base}).encode()))
    assert answer == {"error": "host function 'http_request' is not granted to step 'get'"}
    assert site.seen == []


async def test_extism_builtin_http_is_refused_for_every_host(
    nc: Client, settings: Settings, push: Any, apply: Any, web: Callable[..., Web]
) -> None:
    site = web({"/hello": text("hello")})
    await push("fetcher")
    # Both spellings Extism's own allow-list would have matched for this URL.
    allowed = ["127.0.0.1", f"127.0.0.1:{site.port}"]
    await apply(fetch_workflow("builtin", allowed, function="extism_fetch"))
    async with Worker(nc, settings=settings) as worker:
        await publish(nc, "acme.builtin.in", {"url": f"{site.base}/hello"})
        await worker.drain()
    [letter] = await dlq.letters(nc.jetstream())
    assert letter.kind == "trap", letter.error
    assert f"HTTP request to {site.base}/hello is not allowed" in letter.error
    assert site.seen == []
    assert await stored(nc, "acme.builtin.out") == []


# -- hops: names, addresses, ports, redirects ----------------------------------------


@pytest.mark.parametrize("entry", ["127.0.0.1", "127.0.0.1/32", "127.0.0.0/8"])
def test_an_explicit_ip_or_network_entry_allows_a_private_address(
    web: Callable[..., Web], entry: str
) -> None:
    site = web({"/echo": echo})
    resolver, asked = resolving({"api.example": ["127.0.0.1"]})
    policy = http_policy([f"api.example:{site.port}", entry], resolver=resolver)
    answer = get(f"http://api.example:{site.port}/echo", policy)
    assert answer["status"] == 200
    assert json.loads(answer["body"])["host"] == f"api.example:{site.port}"  # the name, not the IP
    assert asked == ["api.example"]


def test_every_hop_is_resolved_once_and_connects_to_the_checked_address(
    web: Callable[..., Web],
) -> None:
    """DNS rebinding: the second answer for a name never replaces the checked one."""
    answers = iter([["127.0.0.1"], ["127.0.0.1"], ["169.254.169.254"]])
    asked: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        asked.append(host)
        return next(answers)

    site = web({"/hello": text("checked address"), "/again": redirect("/hello")})
    policy = http_policy([f"api.example:{site.port}", "127.0.0.1"], resolver=rebinding)
    assert get(f"http://api.example:{site.port}/hello", policy)["body"] == "checked address"
    assert asked == ["api.example"]  # one lookup for one hop; the connection used its answer
    with pytest.raises(HostFunctionError, match=r"redirect to http://api\.example:\d+/hello "
                       r"refused: api\.example resolves to 169\.254\.169\.254"):  # fmt: skip
        get(f"http://api.example:{site.port}/again", policy)
    assert asked == ["api.example"] * 3  # the redirect's hop was looked up and checked again
    assert [s.path for s in site.seen] == ["/hello", "/again"]


def test_an_entry_without_a_port_allows_only_the_default_port(web: Callable[..., Web]) -> None:
    site = web({"/hello": text("hello")})
    with pytest.raises(
        HostFunctionError, match=rf"127\.0\.0\.1:{site.port} is not in the step's allowed_hosts"
    ):
        get(f"{site.base}/hello", http_policy(["127.0.0.1"]))
    assert get(f"{site.base}/hello", http_policy([f"127.0.0.1:{site.port}"]))["body"] == "hello"
    assert site.seen and len(site.seen) == 1


def test_a_redirect_between_allowed_hosts_is_followed(web: Callable[..., Web]) -> None:
    second = web({"/there": text("from the second server")})
    first = web({"/start": redirect(f"{second.base}/there", 307)})
    policy = http_policy([f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"])
    answer = get(f"{first.base}/start", policy)
    assert (answer["status"], answer["body"]) == (200, "from the second server")
    assert answer["url"] == f"{second.base}/there"


def test_redirect_to_an_unlisted_port_is_refused_before_connecting(web: Callable[..., Web]) -> None:
    second = web({"/secret": text("secret")})
    first = web({"/start": redirect(f"{second.base}/secret?token=abc")})
    with pytest.raises(HostFunctionError) as caught:
        get(f"{first.base}/start", http_policy([f"127.0.0.1:{first.port}"]))
    assert str(caught.value) == (
        f"http_request: redirect to http://127.0.0.1:{second.port}/secret?… refused: "
        f"127.0.0.1:{second.port} is not in the step's allowed_hosts"
    )
    assert second.seen == []


@pytest.mark.parametrize("location", ["file:///etc/passwd", "gopher://127.0.0.1:4222/"])
def test_redirect_to_another_scheme_is_refused(web: Callable[..., Web], location: str) -> None:
    site = web({"/start": redirect(location)})
    with pytest.raises(HostFunctionError, match="only http and https URLs are allowed"):
        get(f"{site.base}/start", http_policy([f"127.0.0.1:{site.port}"]))


def test_at_most_five_redirects(web: Callable[..., Web]) -> None:
    site = web({"/loop/": loop})
    policy = http_policy([f"127.0.0.1:{site.port}"])
    assert get(f"{site.base}/loop/5", policy)["body"] == "end of the chain"
    site.seen.clear()
    with pytest.raises(HostFunctionError, match=r"/loop/6 refused: more than 5 redirects"):
        get(f"{site.base}/loop/6", policy)
    assert [s.path for s in site.seen] == [f"/loop/{n}" for n in range(6, 0, -1)]  # not /loop/0


def test_a_module_can_see_a_redirect_instead_of_following_it(web: Callable[..., Web]) -> None:
    site = web({"/start": redirect("http://169.254.169.254/latest/meta-data/")})
    answer = get(
        f"{site.base}/start", http_policy([f"127.0.0.1:{site.port}"]), follow_redirects=False
    )
    assert answer["status"] == 302
    assert answer["headers"]["location"] == "http://169.254.169.254/latest/meta-data/"


def test_credentials_stay_with_their_origin_and_303_becomes_get(web: Callable[..., Web]) -> None:
    other = web({"/echo": echo})
    site = web(
        {
            "/echo": echo,
            "/same": redirect("/echo", 307),
            "/away": redirect(f"{other.base}/echo", 303),
        }
    )
    policy = http_policy([f"127.0.0.1:{site.port}", f"127.0.0.1:{other.port}"])
    secret = {"Authorization": "Bearer s3cret", "X-Test": "kept"}
    same = json.loads(
        get(f"{site.base}/same", policy, method="POST", headers=secret, body="b")["body"]
    )
    assert (same["method"], same["authorization"], same["body"]) == ("POST", "Bearer s3cret", "b")
    away = json.loads(
        get(f"{site.base}/away", policy, method="POST", headers=secret, body="b")["body"]
    )
    assert (away["method"], away["authorization"], away["x_test"], away["body"]) == (
        "GET",
        None,
        "kept",
        "",
    )


# -- limits ---------------------------------------------------------------------------


def test_the_response_body_is_capped(web: Callable[..., Web]) -> None:
    site = web(
        {
            "/exact": big(MiB, length=True),
            "/declared": big(MiB + 1, length=True),
            "/streamed": big(3 * MiB, length=False),
        }
    )
    policy = http_policy([f"127.0.0.1:{site.port}"])
    assert len(get(f"{site.base}/exact", policy)["body"]) == MiB
    with pytest.raises(
        HostFunctionError, match=r"^http_request: response over 1048576 bytes \(Content-Length"
    ):
        get(f"{site.base}/declared", policy)
    with pytest.raises(HostFunctionError, match=r"^http_request: response over 1048576 bytes$"):
        get(f"{site.base}/streamed", policy)
    small = http_policy([f"127.0.0.1:{site.port}"], max_response_bytes=1000)
    with pytest.raises(HostFunctionError, match="response over 1000 bytes"):
        get(f"{site.base}/exact", small)


@pytest.mark.parametrize(
    ("routes", "path"),
    [
        ({"/slow": slow_headers(30)}, "/slow"),
        ({"/drip": drip}, "/drip"),  # every read is quick; the whole is not
        ({"/loop/": slow_loop}, "/loop/5"),  # each hop is quick; together they are not
    ],
    ids=["slow headers", "slow body", "slow redirects"],
)
def test_the_whole_request_is_bounded_in_time(
    web: Callable[..., Web], routes: dict[str, Route], path: str
) -> None:
    site = web(routes)
    policy = http_policy([f"127.0.0.1:{site.port}"], timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(HostFunctionError) as caught:
        get(f"{site.base}{path}", policy)
    took = time.monotonic() - started
    assert str(caught.value) == (
        f"http_request: GET {site.base}{path} got no complete response within 0.5 s "
        "(the limit for the whole request, redirects included)"
    )
    assert 0.45 < took < 1.5


def test_the_request_body_is_capped(web: Callable[..., Web]) -> None:
    site = web({"/echo": echo})
    policy = http_policy([f"127.0.0.1:{site.port}"], max_request_bytes=10)
    with pytest.raises(HostFunctionError, match="request body is 11 bytes, over the limit of 10"):
        get(f"{site.base}/echo", policy, method="POST", body="x" * 11)
    assert site.seen == []


# -- the request and response format --------------------------------------------------


def test_binary_bodies_travel_as_base64(web: Callable[..., Web]) -> None:
    payload = bytes(range(256))

    def back(handler: _Handler, body: bytes) -> None:
        reply(handler, 200, body, {"Content-Type": "application/octet-stream"})

    site = web({"/back": back, "/text": text("héllo")})
    policy = http_policy([f"127.0.0.1:{site.port}"])
    answer = get(
        f"{site.base}/back", policy, method="PUT", body_base64=base64.b64encode(payload).decode()
    )
    assert "body" not in answer
    assert base64.b64decode(answer["body_base64"]) == payload
    assert site.seen[0].body == payload
    assert get(f"{site.base}/text", policy)["body"] == "héllo"  # UTF-8 text stays text


def test_errors_from_the_network_are_clear(web: Callable[..., Web]) -> None:
    site = web({})
    port = site.port
    resolver, _ = resolving({})
    with pytest.raises(HostFunctionError, match=r"cannot resolve nowhere\.example: .*not known"):
        get("http://nowhere.example/", http_policy(["nowhere.example"], resolver=resolver))
    assert get(f"{site.base}/missing", http_policy([f"127.0.0.1:{port}"]))["status"] == 404
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with pytest.raises(
        HostFunctionError, match=rf"cannot connect to 127\.0\.0\.1:{closed}: connection refused"
    ):
        get(f"http://127.0.0.1:{closed}/", http_policy([f"127.0.0.1:{closed}"]))


# -- HTTPS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for api.example (openssl CLI)."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=api.example",
            "-addext", "subjectAltName=DNS:api.example",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_https_uses_the_name_for_sni_and_the_certificate(
    web: Callable[..., Web], certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    site = web({"/hello": text("over TLS")}, tls=server_tls)
    resolver, asked = resolving({"api.example": ["127.0.0.1"]})
    trusting = ssl.create_default_context(cafile=str(cert))
    policy = http_policy(
        [f"api.example:{site.port}", "127.0.0.1"], resolver=resolver, tls_context=trusting
    )
    answer = get(f"https://api.example:{site.port}/hello", policy)
    assert (answer["status"], answer["body"]) == (200, "over TLS")
    assert site.sni == ["api.example"]
    assert asked == ["api.example"]
    # With the system's CAs the self-signed certificate is refused.
    default = http_policy([f"api.example:{site.port}", "127.0.0.1"], resolver=resolver)
    with pytest.raises(HostFunctionError, match="TLS certificate not valid"):
        get(f"https://api.example:{site.port}/hello", default)
