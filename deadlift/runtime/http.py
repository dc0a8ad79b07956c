"""Deadlift's own outbound HTTP for guest modules: the built-in host function ``http_request``.

Extism's built-in HTTP checks a step's allow-list only on the first URL and then
follows redirects anywhere (a public host could send a module to the NATS
monitor port). Deadlift therefore gives Extism an empty allow-list and offers
this host function instead. A step reaches the network only when it grants
``http_request`` *and* lists the hosts in ``allowed_hosts``.

On every hop (the first URL and each redirect, at most 5):

* the scheme must be ``http`` or ``https`` and the host and port must match an
  ``allowed_hosts`` entry (an entry without ``:port`` allows only the scheme's
  default port, 80 or 443);
* a host name is resolved **once**; every address it resolves to must be public.
  Loopback, private (RFC 1918), shared (100.64/10), link-local (169.254/16, the
  cloud metadata address), unique-local and link-local IPv6, multicast,
  unspecified and reserved addresses — also inside IPv4-mapped or 6to4 IPv6 —
  are refused unless an IP or network entry (``10.0.0.0/8``, ``127.0.0.1``) covers
  them;
* the connection goes to the address that was checked (no second DNS lookup, so
  DNS rebinding cannot swap it), with the name in ``Host`` and TLS SNI.

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
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from deadlift.errors import ConfigError, HostFunctionError
from deadlift.wasm.hostfns import HostCall, host_function

HTTP_SERVICE = "http"
"""``HostCall.services`` key holding the step's :class:`HttpPolicy`."""

DEFAULT_MAX_RESPONSE_BYTES = 1024 * 1024
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_REDIRECTS = 5
DEFAULT_PORTS = {"http": 80, "https": 443}
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "deadlift"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]
"""``resolver(host, port) -> addresses`` (strings); injectable for tests."""

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
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


# -- allow-list ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostRule:
    """One ``allowed_hosts`` entry: a host name (``*.`` wildcard allowed) or an IP network."""

    entry: str
    name: str | None = None
    network: IPNetwork | None = None
    port: int | None = None  # None: only the scheme's default port

    def allows_port(self, scheme: str, port: int) -> bool:
        """Whether a URL of ``scheme`` on ``port`` is allowed by this entry's port."""
        return port == (self.port if self.port is not None else DEFAULT_PORTS[scheme])

    def matches_name(self, host: str) -> bool:
        """Whether host name ``host`` matches (``*.example.com``: any subdomain, not itself)."""
        if self.name is None:
            return False
        if self.name.startswith("*."):
            return host.endswith(self.name[1:])
        return host == self.name

    def covers(self, address: IPAddress) -> bool:
        """Whether this is an IP or network entry that holds ``address``."""
        return self.network is not None and address in self.network


def parse_allowed_host(entry: str) -> HostRule:
    """Parse one ``allowed_hosts`` entry.

    Forms: ``api.example.com``, ``*.example.com``, ``api.example.com:8443``,
    ``203.0.113.7``, ``127.0.0.1:8080``, ``10.0.0.0/8``, ``::1``, ``[::1]:8080``.

    Raises:
        ConfigError: the entry is none of those (it is also a ValueError).
    """
    if not isinstance(entry, str) or not entry.strip():
        raise ConfigError(f"allowed_hosts entry {entry!r}: must be a host name or an IP address")
    text = entry.strip().lower()
    if "://" in text:
        raise ConfigError(f"allowed_hosts entry {entry!r}: write the host (and :port), not a URL")
    host, port = _split_port(text, entry)
    if "/" in host or _ip(host) is not None:
        try:
            network = ipaddress.ip_network(host, strict=True)
        except ValueError as exc:
            raise ConfigError(f"allowed_hosts entry {entry!r}: {exc}") from None
        if isinstance(network, ipaddress.IPv6Network) and network.prefixlen == 128:
            mapped = network.network_address.ipv4_mapped
            if mapped is not None:
                network = ipaddress.IPv4Network(mapped)
        return HostRule(entry, network=network, port=port)
    if text == "*" or host == "*":
        raise ConfigError(
            f"allowed_hosts entry {entry!r}: a bare * is not allowed; name the hosts "
            "(a leading *. matches subdomains: *.example.com)"
        )
    wildcard = host.startswith("*.")
    name = _hostname(host[2:] if wildcard else host)
    if name is None:
        raise ConfigError(
            f"allowed_hosts entry {entry!r}: not a host name, *.domain, IP address or network"
        )
    return HostRule(entry, name=("*." if wildcard else "") + name, port=port)


def _split_port(text: str, entry: str) -> tuple[str, int | None]:
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1 :] if end > 0 else "?"
        if rest and not rest.startswith(":"):
            raise ConfigError(
                f"allowed_hosts entry {entry!r}: write IPv6 with a port as [::1]:8080"
            )
        return text[1:end], _port(rest[1:], entry) if rest else None
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, _port(port, entry)
    return text, None


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"allowed_hosts entry {entry!r}: port must be 1 to 65535")
    return int(text)


def _ip(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _hostname(text: str) -> str | None:
    """``text`` as a lowercase ASCII (IDNA) host name, or None if it is not one."""
    name = text.removesuffix(".")
    try:
        name = name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        return None
    return name


def address_problem(address: IPAddress) -> str | None:
    """Why ``address`` needs an explicit allowed_hosts entry ("loopback", ...), or None."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            problem = address_problem(embedded)
            return f"{problem} (embedded {embedded})" if problem else None
    checks: list[tuple[bool, str]] = [
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "loopback"),
        (address in _METADATA, "link-local (cloud metadata)"),
        (address.is_link_local, "link-local"),
        (address in _SHARED, "shared (CGNAT)"),
        (address in _UNIQUE_LOCAL, "unique-local"),
        (isinstance(address, ipaddress.IPv6Address) and address.is_site_local, "site-local"),
        (address.is_multicast, "multicast"),
        (address.is_private, "private"),
        (address.is_reserved, "reserved"),
        (not address.is_global, "non-public"),
    ]
    return next((label for hit, label in checks if hit), None)


@dataclass(frozen=True, slots=True)
class HttpPolicy:
    """What ``http_request`` may do for one step. Build it with :func:`http_policy`."""

    rules: tuple[HostRule, ...] = ()
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    resolver: Resolver | None = field(default=None, compare=False)  # None: system_resolver
    tls_context: ssl.SSLContext | None = field(default=None, compare=False)  # None: system CAs

    def check_target(self, target: _Target) -> None:
        """Raise :class:`_Refused` unless ``target``'s host and port are allowed."""
        if target.ip is not None:
            ok = any(
                r.covers(target.ip) and r.allows_port(target.scheme, target.port)
                for r in self.rules
            )
        else:
            ok = any(
                r.matches_name(target.host) and r.allows_port(target.scheme, target.port)
                for r in self.rules
            )
        if not ok:
            raise _Refused(f"{target.hostport} is not in the step's allowed_hosts")

    def check_address(self, target: _Target, address: IPAddress) -> None:
        """Raise :class:`_Refused` if a name resolved to an address that needs an explicit entry."""
        problem = address_problem(address)
        if problem is not None and not any(r.covers(address) for r in self.rules):
            raise _Refused(
                f"{target.host} resolves to {address}, a {problem} address, which is not in "
                f'the step\'s allowed_hosts (list "{address}" to allow it)'
            )


def http_policy(
    allowed_hosts: Sequence[str],
    *,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    call_timeout_ms: int | None = None,
    max_redirects: int = DEFAULT_MAX_REDIRECTS,
    resolver: Resolver | None = None,
    tls_context: ssl.SSLContext | None = None,
) -> HttpPolicy:
    """The policy for a step that lists ``allowed_hosts``.

    ``call_timeout_ms`` (the step's module timeout) caps ``timeout_s``: a request
    never outlives the module call that made it.

    Raises:
        ConfigError: an entry is not a valid host, IP address or network, or a limit
            is not positive.
    """
    if min(max_response_bytes, max_request_bytes, timeout_s) <= 0 or max_redirects < 0:
        raise ConfigError("http_request limits must be positive")
    if call_timeout_ms is not None:
        timeout_s = min(timeout_s, call_timeout_ms / 1000)
    return HttpPolicy(
        rules=tuple(parse_allowed_host(entry) for entry in allowed_hosts),
        max_response_bytes=max_response_bytes,
        max_request_bytes=max_request_bytes,
        timeout_s=timeout_s,
        max_redirects=max_redirects,
        resolver=resolver,
        tls_context=tls_context,
    )


# -- requests --------------------------------------------------------------------


class _Refused(Exception):
    """A hop the policy does not allow (the message is the reason)."""


class _TimeUp(Exception):
    """The request's deadline passed."""


@dataclass(frozen=True, slots=True)
class _Target:
    """One parsed URL."""

    url: str
    scheme: str
    host: str  # lowercase IDNA name, or the IP address text
    ip: IPAddress | None
    port: int
    path: str  # path and query, as sent in the request line

    @property
    def hostport(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def authority(self) -> str:
        """The ``Host`` header: the port only when it is not the scheme's default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    @property
    def shown(self) -> str:
        """The URL for messages: no query string or fragment (they may hold keys)."""
        path, _, query = self.path.partition("?")
        return f"{self.scheme}://{self.authority}{path}" + ("?…" if query else "")


def parse_url(url: str) -> _Target:
    """Parse an http(s) URL.

    Raises:
        HostFunctionError: it is not an absolute http or https URL with a host.
    """
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise HostFunctionError(f"http_request: URL {url[:200]!r} has spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise HostFunctionError(f"http_request: invalid URL {url[:200]!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise HostFunctionError(
            f"http_request: URL {url[:200]!r} refused: only http and https URLs are allowed"
        )
    if parts.username is not None or parts.password is not None:
        raise HostFunctionError(
            "http_request: URLs with user:password@ are not supported; "
            "send an Authorization header instead"
        )
    raw = parts.hostname or ""
    ip = _ip(raw)
    host = str(ip) if ip is not None else _hostname(raw)
    if not host:
        raise HostFunctionError(f"http_request: URL {url[:200]!r} has no valid host")
    path = "".join(c if ord(c) < 128 else quote(c) for c in parts.path or "/")
    query = "".join(c if ord(c) < 128 else quote(c) for c in parts.query)
    return _Target(
        url=url,
        scheme=scheme,
        host=host,
        ip=ip,
        port=port if port is not None else DEFAULT_PORTS[scheme],
        path=path + (f"?{query}" if query else ""),
    )


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
        except _Refused as exc:
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


def _response(answer: _Answer, target: _Target) -> dict[str, Any]:
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


def _resolve(policy: HttpPolicy, target: _Target, clock: _Clock) -> list[IPAddress]:
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
    addresses = [a for a in (_ip(str(text)) for text in result[0]) if a is not None]
    if not addresses:
        raise HostFunctionError(f"http_request: {target.host} resolves to no address")
    for address in addresses:
        policy.check_address(target, address)
    return addresses


def _hop(policy: HttpPolicy, req: _Request, target: _Target, clock: _Clock) -> _Answer:
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
        self, target: _Target, address: IPAddress, timeout: float, context: ssl.SSLContext
    ) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self.address = str(address)

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _TLSConnection(http.client.HTTPSConnection):
    """HTTPS to an address checked beforehand; SNI and certificate check use the name."""

    def __init__(
        self, target: _Target, address: IPAddress, timeout: float, context: ssl.SSLContext
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
    policy: HttpPolicy, target: _Target, addresses: list[IPAddress], clock: _Clock
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
