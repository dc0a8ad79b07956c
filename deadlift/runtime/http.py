"""Deadlift's own outbound HTTP for guest modules: the built-in host function ``http_request``.

Extism's built-in HTTP checks a step's allow-list only on the first URL and then
follows redirects anywhere (a public host could send a module to the NATS
monitor port). Deadlift therefore gives Extism an empty allow-list and offers
this host function instead. A step reaches the network only when it grants
``http_request`` *and* lists the hosts in ``allowed_hosts``.

Every hop (the first URL and each redirect, at most 5) is checked against the
step's :class:`~deadlift.runtime.http_policy.HttpPolicy` (host, port and every
address a name resolves to). A host name is resolved **once**, and the
connection goes to the address that was checked (no second DNS lookup, so DNS
rebinding cannot swap it), with the name in ``Host`` and TLS SNI.

The whole request, redirects included, has one deadline (10 s by default); the
request body and the response body are capped (1 MiB each by default).
Credentials (``Authorization``, ``Cookie``) are dropped when a redirect changes
the origin. Error messages show URLs without their query string (it may hold
keys).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import re
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

from deadlift.errors import HostFunctionError
from deadlift.runtime.http_policy import (
    HttpPolicy,
    IPAddress,
    Refused,
    Target,
    parse_ip,
    parse_url,
)
from deadlift.wasm.hostfns import HostCall, host_function

HTTP_SERVICE = "http"
"""``HostCall.services`` key holding the step's :class:`HttpPolicy`."""

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "deadlift"

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Set by Deadlift on every request; a module may not choose them.
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "te", "upgrade", "keep-alive"}
)
# Not sent on to another origin after a redirect.
_CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
_REQUEST_FIELDS = frozenset({"method", "url", "headers", "body", "body_base64", "follow_redirects"})


def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses from the system resolver (``getaddrinfo``), in its order."""
    found: list[str] = []
    for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        address = str(info[4][0])
        if address not in found:
            found.append(address)
    return found


# -- requests --------------------------------------------------------------------


class _TimeUp(Exception):
    """The request's deadline passed."""


@dataclass(slots=True)
class _Request:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None
    follow_redirects: bool


def _parse_request(request: Any, policy: HttpPolicy) -> _Request:
    usage = 'http_request request must be {"url": "...", "method"?, "headers"?, "body"?}'
    if not isinstance(request, dict) or not isinstance(request.get("url"), str):
        raise HostFunctionError(usage)
    unknown = sorted(set(request) - _REQUEST_FIELDS)
    if unknown:
        raise HostFunctionError(f"http_request: unknown request field(s) {', '.join(unknown)}")
    method = request.get("method", "GET")
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise HostFunctionError(
            f"http_request: method {method!r} is not one of {', '.join(sorted(METHODS))}"
        )
    follow = request.get("follow_redirects", True)
    if not isinstance(follow, bool):
        raise HostFunctionError('http_request: "follow_redirects" must be true or false')
    body = _request_body(request)
    if body is not None and len(body) > policy.max_request_bytes:
        raise HostFunctionError(
            f"http_request: request body is {len(body)} bytes, over the limit of "
            f"{policy.max_request_bytes}"
        )
    return _Request(method.upper(), request["url"], _request_headers(request), body, follow)


def _request_body(request: Mapping[str, Any]) -> bytes | None:
    text, encoded = request.get("body"), request.get("body_base64")
    if text is not None and encoded is not None:
        raise HostFunctionError('http_request: send "body" or "body_base64", not both')
    if text is not None:
        if not isinstance(text, str):
            raise HostFunctionError('http_request: "body" must be a string (UTF-8 text)')
        return text.encode()
    if encoded is not None:
        try:
            return base64.b64decode(encoded, validate=True)
        except (TypeError, ValueError):
            raise HostFunctionError('http_request: "body_base64" is not valid base64') from None
    return None


def _request_headers(request: Mapping[str, Any]) -> dict[str, str]:
    headers = request.get("headers") or {}
    if not isinstance(headers, dict):
        raise HostFunctionError('http_request: "headers" must be an object of strings')
    out: dict[str, str] = {}
    for name, value in headers.items():
        if (
            not isinstance(value, str)
            or not _TOKEN.match(name)
            or any(c in value for c in "\r\n\0")
        ):
            raise HostFunctionError(f"http_request: invalid header {name!r}")
        if name.lower() in _RESERVED_HEADERS:
            raise HostFunctionError(f"http_request: header {name!r} is set by Deadlift")
        out[name] = value
    return out


@dataclass(slots=True)
class _Clock:
    limit: float
    end: float = 0.0

    def __post_init__(self) -> None:
        self.end = time.monotonic() + self.limit

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise _TimeUp
        return left


@dataclass(slots=True)
class _Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    location: str | None


def perform(policy: HttpPolicy, request: Any) -> dict[str, Any]:
    """Make the request a module asked for, under ``policy``; the JSON response.

    Raises:
        HostFunctionError: refused by the policy, over a limit, or failed.
    """
    req = _parse_request(request, policy)
    clock = _Clock(policy.timeout_s)
    target = parse_url(req.url)
    first = target
    redirects = 0
    while True:
        try:
            policy.check_target(target)
            answer = _hop(policy, req, target, clock)
        except Refused as exc:
            what = (
                f"{req.method} {target.shown}" if redirects == 0 else f"redirect to {target.shown}"
            )
            raise HostFunctionError(f"http_request: {what} refused: {exc}") from None
        except _TimeUp:
            raise HostFunctionError(
                f"http_request: {req.method} {first.shown} got no complete response within "
                f"{policy.timeout_s:g} s (the limit for the whole request, redirects included)"
            ) from None
        if answer.location is None or not req.follow_redirects:
            return _response(answer, target)
        if redirects >= policy.max_redirects:
            raise HostFunctionError(
                f"http_request: {req.method} {first.shown} refused: more than "
                f"{policy.max_redirects} redirects"
            )
        redirects += 1
        following = parse_url(urljoin(target.url, answer.location))
        _redirect(req, answer.status, same_origin=following.origin == target.origin)
        target = following


def _redirect(req: _Request, status: int, *, same_origin: bool) -> None:
    """Adjust ``req`` for the next hop, as browsers do."""
    if (status == 303 and req.method != "HEAD") or (status in (301, 302) and req.method == "POST"):
        req.method, req.body = "GET", None
        req.headers = {k: v for k, v in req.headers.items() if not k.lower().startswith("content-")}
    if not same_origin:
        req.headers = {k: v for k, v in req.headers.items() if k.lower() not in _CREDENTIAL_HEADERS}


def _response(answer: _Answer, target: Target) -> dict[str, Any]:
    headers: dict[str, str] = {}
    for name, value in answer.headers:
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    out: dict[str, Any] = {"status": answer.status, "url": target.url, "headers": headers}
    try:
        out["body"] = answer.body.decode("utf-8")
    except UnicodeDecodeError:
        out["body_base64"] = base64.b64encode(answer.body).decode("ascii")
    return out


def _resolve(policy: HttpPolicy, target: Target, clock: _Clock) -> list[IPAddress]:
    """The checked addresses of ``target``: resolved once, every one of them allowed."""
    if target.ip is not None:
        return [target.ip]
    resolver = policy.resolver or system_resolver
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(list(resolver(target.host, target.port)))
        except Exception as exc:
            result.append(exc)

    thread = threading.Thread(target=run, name="deadlift-resolve", daemon=True)
    thread.start()
    thread.join(clock.left())
    if not result:
        raise _TimeUp
    if isinstance(result[0], Exception):
        raise HostFunctionError(f"http_request: cannot resolve {target.host}: {result[0]}")
    addresses = [a for a in (parse_ip(str(text)) for text in result[0]) if a is not None]
    if not addresses:
        raise HostFunctionError(f"http_request: {target.host} resolves to no address")
    for address in addresses:
        policy.check_address(target, address)
    return addresses


def _hop(policy: HttpPolicy, req: _Request, target: Target, clock: _Clock) -> _Answer:
    """One request/response on a fresh connection to a checked address."""
    addresses = _resolve(policy, target, clock)
    conn = _connect(policy, target, addresses, clock)
    # getresponse() hands the socket to the response (conn.sock becomes None): keep it.
    sock = conn.sock
    cut = threading.Event()
    watchdog = threading.Timer(max(clock.end - time.monotonic(), 0), _cut, args=(sock, cut))
    watchdog.daemon = True
    watchdog.start()
    resp: http.client.HTTPResponse | None = None
    try:
        headers = {"Host": target.authority, "User-Agent": USER_AGENT, **req.headers}
        headers["Connection"] = "close"
        conn.request(req.method, target.path, body=req.body, headers=headers)
        resp = conn.getresponse()
        location = resp.getheader("Location") if resp.status in REDIRECTS else None
        if location is not None and req.follow_redirects:
            return _Answer(resp.status, resp.getheaders(), b"", location)
        body = _read_body(resp, policy.max_response_bytes, clock, sock)
        if cut.is_set():  # a body that ends at close was cut short by the deadline
            raise _TimeUp
        return _Answer(resp.status, resp.getheaders(), body, location)
    except (OSError, http.client.HTTPException) as exc:
        # A socket timeout, or a cut by the watchdog, means the deadline passed.
        if isinstance(exc, TimeoutError) or cut.is_set():
            raise _TimeUp from None
        raise HostFunctionError(
            f"http_request: {req.method} {target.shown} failed: {_describe(exc)}"
        ) from None
    finally:
        watchdog.cancel()
        if resp is not None:
            resp.close()
        conn.close()


def _read_body(
    resp: http.client.HTTPResponse, limit: int, clock: _Clock, sock: socket.socket | None
) -> bytes:
    if resp.length is not None and resp.length > limit:
        raise HostFunctionError(
            f"http_request: response over {limit} bytes (Content-Length: {resp.length})"
        )
    chunks: list[bytes] = []
    total = 0
    while True:
        if sock is not None:
            sock.settimeout(clock.left())
        chunk = resp.read1(min(65536, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise HostFunctionError(f"http_request: response over {limit} bytes")
        chunks.append(chunk)


def _cut(sock: socket.socket | None, cut: threading.Event) -> None:
    """Watchdog: end a connection whose deadline passed (a blocked read returns)."""
    cut.set()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not valid: {exc.verify_message}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, http.client.IncompleteRead):
        return "the connection closed before the whole response arrived"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without a response"
    return str(exc) or type(exc).__name__


class _Connection(http.client.HTTPConnection):
    """HTTP to an address checked beforehand: no DNS lookup here."""

    def __init__(
        self, target: Target, address: IPAddress, timeout: float, context: ssl.SSLContext
    ) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self.address = str(address)

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _TLSConnection(http.client.HTTPSConnection):
    """HTTPS to an address checked beforehand; SNI and certificate check use the name."""

    def __init__(
        self, target: Target, address: IPAddress, timeout: float, context: ssl.SSLContext
    ) -> None:
        super().__init__(target.host, target.port, timeout=timeout, context=context)
        self.address = str(address)
        self.tls = context

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)


_TLS: ssl.SSLContext | None = None


def _tls_context() -> ssl.SSLContext:
    global _TLS
    if _TLS is None:
        _TLS = ssl.create_default_context()
    return _TLS


def _connect(
    policy: HttpPolicy, target: Target, addresses: list[IPAddress], clock: _Clock
) -> http.client.HTTPConnection:
    """A connection to the first of ``addresses`` that answers."""
    kind = _TLSConnection if target.scheme == "https" else _Connection
    context = policy.tls_context or _tls_context()
    error: BaseException | None = None
    for address in addresses:
        conn = kind(target, address, clock.left(), context)
        try:
            conn.connect()
            return conn
        except OSError as exc:
            conn.close()
            if isinstance(exc, TimeoutError):
                raise _TimeUp from None
            error = exc
    raise HostFunctionError(
        f"http_request: cannot connect to {target.hostport}: {_describe(error or OSError())}"
    )


@host_function
def http_request(call: HostCall, request: Any) -> Any:
    """HTTP to the step's allowed_hosts: ``{"url", "method", "headers", "body"}`` → response."""
    policy = call.services.get(HTTP_SERVICE)
    if not isinstance(policy, HttpPolicy) or not policy.rules:
        raise HostFunctionError(
            f"http_request: step {call.step!r} lists no allowed_hosts, so it may not make "
            "HTTP requests"
        )
    return perform(policy, request)
