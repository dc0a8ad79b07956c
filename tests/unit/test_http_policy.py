"""Outbound HTTP policy without a network: allowed_hosts entries, address classes, requests.

What ``http_request`` refuses before it opens a connection. The requests that do
reach test servers, and the fetcher module through a worker, are in
``tests/integration/test_attack_http.py``.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest

from deadlift.errors import ConfigError, HostFunctionError
from deadlift.runtime.builtins import BUILTINS
from deadlift.runtime.http import http_request, perform
from deadlift.runtime.http_policy import (
    HttpPolicy,
    address_problem,
    http_policy,
    parse_allowed_host,
)
from deadlift.wasm.hostfns import HostCall, invoke
from tests.unit.fakes import resolving


def get(url: str, policy: HttpPolicy, **fields: Any) -> dict[str, Any]:
    return perform(policy, {"url": url, **fields})


# -- the allow-list ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "name", "network", "port"),
    [
        ("api.example.com", "api.example.com", None, None),
        ("API.Example.com.", "api.example.com", None, None),
        ("api.example.com:8443", "api.example.com", None, 8443),
        ("*.example.com", "*.example.com", None, None),
        ("bücher.example", "xn--bcher-kva.example", None, None),
        ("127.0.0.1", None, "127.0.0.1/32", None),
        ("127.0.0.1:8080", None, "127.0.0.1/32", 8080),
        ("127.0.0.1/32", None, "127.0.0.1/32", None),
        ("10.0.0.0/8", None, "10.0.0.0/8", None),
        ("::1", None, "::1/128", None),
        ("[::1]:8080", None, "::1/128", 8080),
        ("fd00::/8", None, "fd00::/8", None),
        ("::ffff:10.1.2.3", None, "10.1.2.3/32", None),
    ],
)
def test_allowed_hosts_entries(
    entry: str, name: str | None, network: str | None, port: int | None
) -> None:
    rule = parse_allowed_host(entry)
    assert rule.name == name
    assert (str(rule.network) if rule.network else None) == network
    assert rule.port == port


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("*", "a bare \\* is not allowed"),
        ("", "must be a host name"),
        ("http://api.example.com", "write the host \\(and :port\\), not a URL"),
        ("api.example.com/path", "does not appear to be an IPv4 or IPv6 network"),
        ("api.example.com:0", "port must be 1 to 65535"),
        ("api.example.com:http", "port must be 1 to 65535"),
        ("10.0.0.1/8", "has host bits set"),
        ("[::1", "write IPv6 with a port"),
        ("exa mple.com", "not a host name"),
        ("foo.*.example.com", "not a host name"),
    ],
)
def test_bad_allowed_hosts_entries_are_config_errors(entry: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        http_policy([entry])


@pytest.mark.parametrize(
    ("address", "label"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "shared (CGNAT)"),
        ("169.254.169.254", "link-local (cloud metadata)"),
        ("169.254.1.1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "private"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fd00::1", "unique-local"),
        ("fd00:ec2::254", "link-local (cloud metadata)"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback (embedded 127.0.0.1)"),
        ("::ffff:169.254.169.254", "link-local (cloud metadata) (embedded 169.254.169.254)"),
        ("2002:7f00:1::", "loopback (embedded 127.0.0.1)"),  # 6to4
        ("64:ff9b::a00:1", "private (embedded 10.0.0.1)"),  # NAT64
    ],
)
def test_addresses_that_need_an_explicit_entry(address: str, label: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) == label


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111"])
def test_public_addresses_need_no_entry(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is None


def test_the_call_timeout_caps_the_request_time() -> None:
    assert http_policy(["a.example"]).timeout_s == 10.0
    assert http_policy(["a.example"], call_timeout_ms=1500).timeout_s == 1.5
    assert http_policy(["a.example"], timeout_s=2, call_timeout_ms=60_000).timeout_s == 2


# -- hops: names and addresses, before any connection ------------------------


@pytest.mark.parametrize(
    ("answers", "refused"),
    [
        (["127.0.0.1"], "127.0.0.1, a loopback address"),
        (["10.0.0.7"], "10.0.0.7, a private address"),
        (["100.64.1.1"], "100.64.1.1, a shared (CGNAT) address"),
        (["169.254.169.254"], "169.254.169.254, a link-local (cloud metadata) address"),
        (["fd00::1"], "fd00::1, a unique-local address"),
        (["::ffff:10.0.0.1"], "10.0.0.1, a private address"),
        (["93.184.216.34", "192.168.0.10"], "192.168.0.10, a private address"),  # every address
    ],
)
def test_a_name_that_resolves_to_a_private_address_is_refused(
    answers: list[str], refused: str
) -> None:
    resolver, asked = resolving({"api.example": answers})
    policy = http_policy(["api.example"], resolver=resolver)
    with pytest.raises(HostFunctionError) as caught:
        get("http://api.example/x?key=secret", policy)
    assert str(caught.value) == (
        f"http_request: GET http://api.example/x?… refused: api.example resolves to {refused}, "
        "which is not in the step's allowed_hosts (list "
        f'"{refused.split(",")[0]}" to allow it)'
    )
    assert "secret" not in str(caught.value)  # query strings stay out of messages
    assert asked == ["api.example"]


def test_wildcards_match_subdomains_only() -> None:
    rule = parse_allowed_host("*.example.com")
    assert rule.matches_name("api.example.com")
    assert rule.matches_name("a.b.example.com")
    assert not rule.matches_name("example.com")
    assert not rule.matches_name("evilexample.com")
    resolver, asked = resolving({})
    with pytest.raises(
        HostFunctionError, match=r"example\.com:80 is not in the step's allowed_hosts"
    ):
        get("http://example.com/", http_policy(["*.example.com"], resolver=resolver))
    assert asked == []  # refused before any lookup


# -- the request format ---------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"url": "file:///etc/passwd"}, "only http and https URLs are allowed"),
        ({"url": "ftp://api.example/"}, "only http and https URLs are allowed"),
        ({"url": "http://user:pw@api.example/"}, "send an Authorization header instead"),
        ({"url": "http://api.example/a b"}, "has spaces or control characters"),
        ({"url": "http:///nohost"}, "has no valid host"),
        ({"url": "http://api.example:99999/"}, "invalid URL"),
        ({"url": "http://api.example/", "method": "CONNECT"}, "method 'CONNECT' is not one of"),
        ({"url": "http://api.example/", "headers": {"Host": "x"}}, "'Host' is set by Deadlift"),
        ({"url": "http://api.example/", "headers": {"X": "a\r\nB: c"}}, "invalid header 'X'"),
        ({"url": "http://api.example/", "headers": ["x"]}, '"headers" must be an object'),
        ({"url": "http://api.example/", "body": "a", "body_base64": "YQ=="}, "not both"),
        ({"url": "http://api.example/", "body_base64": "!!"}, "not valid base64"),
        ({"url": "http://api.example/", "bdy": "x"}, r"unknown request field\(s\) bdy"),
        ({"uri": "http://api.example/"}, 'request must be {"url"'),
        ("http://api.example/", 'request must be {"url"'),
    ],
)
def test_malformed_requests_are_refused(request_: Any, message: str) -> None:
    resolver, asked = resolving({"api.example": ["93.184.216.34"]})
    with pytest.raises(HostFunctionError, match=message):
        perform(http_policy(["api.example"], resolver=resolver), request_)
    assert asked == []


def test_the_host_function_needs_the_steps_policy() -> None:
    call = HostCall(
        org="acme", workflow="w", step="get", run="r", event_id="e",
        granted={"http_request": BUILTINS["http_request"]},
    )  # fmt: skip
    answer = json.loads(invoke(call, "http_request", b'{"url": "http://api.example/"}'))
    assert answer == {
        "error": "http_request: step 'get' lists no allowed_hosts, so it may not make HTTP requests"
    }
    assert isinstance(call.failure, HostFunctionError)  # the step fails with kind host_function
    assert BUILTINS["http_request"] is http_request
