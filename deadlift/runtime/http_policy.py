"""What a step's outbound HTTP may reach: its ``allowed_hosts``, checked on every hop.

Pure: no sockets here (the client is :mod:`deadlift.runtime.http`). On every hop
(the first URL and each redirect):

* the scheme must be ``http`` or ``https`` and the host and port must match an
  ``allowed_hosts`` entry (an entry without ``:port`` allows only the scheme's
  default port, 80 or 443);
* every address a host name resolves to must be public. Loopback, private
  (RFC 1918), shared (100.64/10), link-local (169.254/16, the cloud metadata
  address), unique-local and link-local IPv6, multicast, unspecified and
  reserved addresses — also inside IPv4-mapped, 6to4 or NAT64 IPv6 — are refused
  unless an IP or network entry (``10.0.0.0/8``, ``127.0.0.1``) covers them.

Messages show URLs without their query string (it may hold keys).
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

from deadlift.errors import ConfigError, HostFunctionError

DEFAULT_MAX_RESPONSE_BYTES = 1024 * 1024
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_REDIRECTS = 5
DEFAULT_PORTS = {"http": 80, "https": 443}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]
"""``resolver(host, port) -> addresses`` (strings); injectable for tests."""

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


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
    if "/" in host or parse_ip(host) is not None:
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


def parse_ip(text: str) -> IPAddress | None:
    """``text`` as an IP address (an IPv4-mapped IPv6 one as IPv4), or None if it is not one."""
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


# -- targets ------------------------------------------------------------------


class Refused(Exception):
    """A hop the policy does not allow (the message is the reason)."""


@dataclass(frozen=True, slots=True)
class Target:
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


def parse_url(url: str) -> Target:
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
    ip = parse_ip(raw)
    host = str(ip) if ip is not None else _hostname(raw)
    if not host:
        raise HostFunctionError(f"http_request: URL {url[:200]!r} has no valid host")
    path = "".join(c if ord(c) < 128 else quote(c) for c in parts.path or "/")
    query = "".join(c if ord(c) < 128 else quote(c) for c in parts.query)
    return Target(
        url=url,
        scheme=scheme,
        host=host,
        ip=ip,
        port=port if port is not None else DEFAULT_PORTS[scheme],
        path=path + (f"?{query}" if query else ""),
    )


@dataclass(frozen=True, slots=True)
class HttpPolicy:
    """What ``http_request`` may do for one step. Build it with :func:`http_policy`."""

    rules: tuple[HostRule, ...] = ()
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    resolver: Resolver | None = field(default=None, compare=False)  # None: system DNS
    tls_context: ssl.SSLContext | None = field(default=None, compare=False)  # None: system CAs

    def check_target(self, target: Target) -> None:
        """Raise :class:`Refused` unless ``target``'s host and port are allowed."""
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
            raise Refused(f"{target.hostport} is not in the step's allowed_hosts")

    def check_address(self, target: Target, address: IPAddress) -> None:
        """Raise :class:`Refused` if a name resolved to an address that needs an explicit entry."""
        problem = address_problem(address)
        if problem is not None and not any(r.covers(address) for r in self.rules):
            raise Refused(
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
