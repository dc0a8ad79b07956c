"""NATS beyond one server, on loopback: a JetStream cluster, and a hub with leaf nodes.

:class:`LocalCluster` runs ``size`` nats-server processes with JetStream, routed
to each other on free loopback ports, each with its own store directory —
what ``deadlift cluster`` runs, and what the fail-over tests kill nodes of.

:class:`LeafTopology` runs a hub server and one server per org, each org's
server connected to the hub by a leaf-node connection bound to that org's hub
account: each organization keeps its own NATS (and JetStream, in its own
domain), and events cross only through the hub's account exports and imports.

Both are closed to strangers: a route (or a leaf connection) must present a
certificate of the topology's own CA (mutual TLS, made here with the
``openssl`` CLI, see :class:`CertificateAuthority`) *and* a password generated
for this topology — nothing ships one. Monitoring, which has no
authentication, listens on 127.0.0.1 only.

Configs are rendered as JSON, which is valid nats-server configuration syntax,
into files only their owner can read; the hand-written equivalents for real
machines are in ``deploy/nats/`` and ``deploy/leafnodes/``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from nats.js import JetStreamContext

from deadlift.errors import DeadliftError
from deadlift.model.orgs import OrgManifest, account_name, nats_accounts
from deadlift.ops.server import (
    Managed,
    free_port,
    get_json,
    kill_server,
    nats_server_binary,
    spawn_server,
    stop_server,
    write_private,
)

CLUSTER_NAME = "deadlift"
ROUTE_USER = "route"
# The monitoring endpoint has no authentication: whatever address the clients
# use, it listens on loopback only.
MONITOR_HOST = "127.0.0.1"
TLS_TIMEOUT_S = 2
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_CA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,62}$")
_HOST = re.compile(r"^(\*\.)?[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")


def new_password() -> str:
    """A random password for routes and leaf connections (never a shipped one)."""
    return secrets.token_urlsafe(24)


# -- certificates -------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A certificate, its private key, and the CA certificate peers must chain to."""

    cert: Path
    key: Path
    ca: Path

    def listener(self) -> dict[str, Any]:
        """A ``tls {}`` block for a route or leaf listener: mutual TLS with this CA
        (a peer must present a certificate it signed)."""
        return {
            "cert_file": str(self.cert),
            "key_file": str(self.key),
            "ca_file": str(self.ca),
            "verify": True,
            "timeout": TLS_TIMEOUT_S,
        }

    def remote(self) -> dict[str, Any]:
        """A ``tls {}`` block for a leaf remote: present this certificate, trust this CA."""
        return {
            "cert_file": str(self.cert),
            "key_file": str(self.key),
            "ca_file": str(self.ca),
            "timeout": TLS_TIMEOUT_S,
        }


def _openssl(*args: str, stdin: bytes | None = None) -> bytes:
    binary = shutil.which("openssl")
    if binary is None:
        raise DeadliftError(
            "openssl not found: it makes the certificates of the cluster's routes and "
            "leaf nodes (install the openssl package)"
        )
    result = subprocess.run(
        [binary, *args], input=stdin, capture_output=True, check=False, timeout=30
    )
    if result.returncode != 0:
        problem = result.stderr.decode(errors="replace").strip()
        raise DeadliftError(f"openssl {args[0]} failed: {problem}")
    return result.stdout


def _subject_alt_names(names: Iterable[str]) -> str:
    seen: list[str] = []
    for name in names:
        try:
            entry = f"IP:{ipaddress.ip_address(name)}"
        except ValueError:
            if not _HOST.match(name):
                raise ValueError(f"host {name!r}: not an IP address or a DNS name") from None
            entry = f"DNS:{name}"
        if entry not in seen:
            seen.append(entry)
    return ", ".join(seen)


def _check_name(what: str, value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"{what} {value!r}: use letters, digits, '.', '_' and '-'")
    return value


class CertificateAuthority:
    """A private CA for one cluster's routes or one hub's leaf nodes (openssl CLI).

    ``directory`` holds ``ca.pem`` and ``ca-key.pem``; an existing pair there is
    reused, otherwise a new one is made (EC P-256). :meth:`issue` writes
    ``NAME.pem`` and ``NAME-key.pem``. Private keys are readable by their owner only.
    Only certificates of *this* CA are accepted by the listeners configured with
    it, so a server that never got one cannot join.
    """

    def __init__(self, directory: str | Path, *, name: str = "deadlift CA", days: int = 3650):
        if not _CA_NAME.match(name):
            raise ValueError(f"CA name {name!r}: use letters, digits, spaces, '.', '_' and '-'")
        self.directory = Path(directory)
        self.cert = self.directory / "ca.pem"
        self.key = self.directory / "ca-key.pem"
        if not (self.cert.is_file() and self.key.is_file()):
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_private(
                self.key, _openssl("ecparam", "-genkey", "-name", "prime256v1", "-noout").decode()
            )
            config = self._config(
                name,
                "[v3_ca]\nbasicConstraints = critical, CA:TRUE, pathlen:0\n"
                "keyUsage = critical, keyCertSign, cRLSign\nsubjectKeyIdentifier = hash\n",
            )
            try:
                pem = _openssl(
                    "req",
                    "-new",
                    "-x509",
                    "-config",
                    str(config),
                    "-extensions",
                    "v3_ca",
                    "-key",
                    str(self.key),
                    "-days",
                    str(days),
                    "-sha256",
                )
            finally:
                config.unlink()
            self.cert.write_bytes(pem)

    def _config(self, common_name: str, extensions: str) -> Path:
        text = (
            f"[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = {common_name}\n{extensions}"
        )
        fd, name = tempfile.mkstemp(dir=self.directory, suffix=".cnf")
        with os.fdopen(fd, "w") as out:
            out.write(text)
        return Path(name)

    def issue(
        self,
        name: str,
        *,
        hosts: Iterable[str] = (),
        common_name: str | None = None,
        days: int = 825,
    ) -> TlsFiles:
        """A certificate for ``name`` (server and client use), valid for ``hosts``.

        Its subject alternative names are ``name`` and every host (IP addresses as
        such); its subject is ``CN=<common_name or name>``.
        """
        _check_name("certificate name", name)
        common_name = _check_name("common name", common_name or name)
        alt_names = _subject_alt_names([name, *hosts])
        key = self.directory / f"{name}-key.pem"
        cert = self.directory / f"{name}.pem"
        write_private(key, _openssl("ecparam", "-genkey", "-name", "prime256v1", "-noout").decode())
        config = self._config(
            common_name,
            "[ext]\nbasicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature, keyEncipherment\n"
            "extendedKeyUsage = serverAuth, clientAuth\n"
            f"subjectAltName = {alt_names}\n",
        )
        try:
            request = _openssl("req", "-new", "-key", str(key), "-config", str(config))
            pem = _openssl(
                "x509",
                "-req",
                "-CA",
                str(self.cert),
                "-CAkey",
                str(self.key),
                "-set_serial",
                str(secrets.randbits(62) | 1 << 62),
                "-days",
                str(days),
                "-sha256",
                "-extfile",
                str(config),
                "-extensions",
                "ext",
                stdin=request,
            )
        finally:
            config.unlink()
        cert.write_bytes(pem)
        return TlsFiles(cert=cert, key=key, ca=self.cert)


# -- one server process ------------------------------------------------------------------


@dataclass
class NatsProcess:
    """One nats-server child process run from a rendered config (a dict)."""

    name: str
    port: int
    monitor_port: int
    workdir: Path
    host: str = "127.0.0.1"
    config: dict[str, Any] = field(default_factory=dict)
    log: bool = True
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        """The HTTP monitoring base URL (always on loopback)."""
        return f"http://{MONITOR_HOST}:{self.monitor_port}"

    @property
    def config_file(self) -> Path:
        return self.workdir / f"{self.name}.conf"

    @property
    def log_file(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def write_config(self) -> Path:
        """Write the config, readable by its owner only (it holds passwords)."""
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        header = f"# {self.name}: generated by deadlift.cluster; do not edit.\n"
        write_private(self.config_file, header + json.dumps(self.config, indent=2) + "\n")
        return self.config_file

    def start(self) -> None:
        """Write the config and start the server (does not wait for readiness)."""
        if self.running:
            return
        self.write_config()
        self.process = spawn_server(
            [nats_server_binary(), "-c", str(self.config_file)],
            self.log_file if self.log else None,
        )

    def check_alive(self) -> None:
        """Raise, with the end of the server's log, if it exited."""
        if self.process is not None and self.process.poll() is not None:
            tail = ""
            with contextlib.suppress(OSError):
                tail = "\n".join(self.log_file.read_text(errors="replace").splitlines()[-8:])
            raise DeadliftError(
                f"nats-server {self.name} exited with code {self.process.returncode} "
                f"(port {self.port} taken, or a bad config {self.config_file}?)\n{tail}"
            )

    def monitor(self, endpoint: str, timeout: float = 1.0) -> dict[str, Any] | None:
        """A monitoring endpoint's JSON (``"jsz"``, ``"leafz"``…), None if no answer."""
        if not self.running:
            return None
        return get_json(f"{self.monitor_url}/{endpoint}", timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (then SIGKILL) and wait."""
        stop_server(self.process, timeout)
        self.process = None

    def kill(self) -> None:
        """SIGKILL and wait; the store is kept."""
        kill_server(self.process)
        self.process = None


def _wait(condition: Any, timeout: float, what: str, nodes: list[NatsProcess]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in nodes:
            node.check_alive()
        if condition():
            return
        time.sleep(0.1)
    raise DeadliftError(f"{what} within {timeout:.0f} s")


class LocalCluster(Managed):
    """``size`` nats-server processes with JetStream, clustered on loopback.

    The routes between the nodes are authenticated twice: mutual TLS with
    certificates of a CA made for this cluster (``<store_dir>/tls``), and the
    cluster's route user and password (random unless given). A server without
    both cannot join, so it never sees or injects any account's traffic.

    Args:
        size: number of nodes (3 for R3 streams).
        store_dir: parent of each node's store (``<store_dir>/n1`` …); a temp dir if None.
        orgs: one account per org from the org manifest (as ``EmbeddedServer(orgs=…)``);
            None: one shared account without authentication (development only).
        name: the cluster name.
        ports: client ports, one per node (free ports if None).
        route_password: the routes' password; a new random one if None.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        store_dir: str | Path | None = None,
        orgs: OrgManifest | None = None,
        name: str = CLUSTER_NAME,
        host: str = "127.0.0.1",
        ports: list[int] | None = None,
        route_password: str | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        if ports is not None and len(ports) != size:
            raise ValueError(f"{len(ports)} ports for {size} nodes")
        self.size = size
        self.name = name
        self.host = host
        self.orgs = orgs
        self.route_user = ROUTE_USER
        self.route_password = route_password or new_password()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="deadlift-cluster-")
            store_dir = self._tmp.name
        self.store_dir = Path(store_dir)
        self.store_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        client_ports = ports or [free_port() for _ in range(size)]
        self.route_ports = [free_port() for _ in range(size)]
        self.nodes = [
            NatsProcess(
                name=f"n{i + 1}",
                port=client_ports[i],
                monitor_port=free_port(),
                workdir=self.store_dir / f"n{i + 1}",
                host=host,
            )
            for i in range(size)
        ]
        self.ca: CertificateAuthority | None = None
        self.tls: list[TlsFiles] = []
        if size > 1:
            self.ca = CertificateAuthority(self.store_dir / "tls", name=f"{name} cluster CA")
            self.tls = [self.ca.issue(node.name, hosts=[host, "localhost"]) for node in self.nodes]
        for i, node in enumerate(self.nodes):
            node.config = self.node_config(i)

    def route_url(self, index: int) -> str:
        """The route URL of node ``index``, with the cluster's route credentials."""
        user = urllib.parse.quote(self.route_user, safe="")
        password = urllib.parse.quote(self.route_password, safe="")
        return f"nats-route://{user}:{password}@{self.host}:{self.route_ports[index]}"

    def node_config(self, index: int) -> dict[str, Any]:
        """The nats-server config of node ``index`` (a dict; JSON is valid config)."""
        node = self.nodes[index]
        config: dict[str, Any] = {
            "server_name": node.name,
            "listen": f"{self.host}:{node.port}",
            "http": f"{MONITOR_HOST}:{node.monitor_port}",
            "jetstream": {"store_dir": str(node.workdir / "store")},
        }
        if self.size > 1:
            config["cluster"] = {
                "name": self.name,
                "listen": f"{self.host}:{self.route_ports[index]}",
                "authorization": {
                    "user": self.route_user,
                    "password": self.route_password,
                    "timeout": TLS_TIMEOUT_S,
                },
                "tls": self.tls[index].listener(),
                "routes": [self.route_url(j) for j in range(self.size) if j != index],
            }
        if self.orgs is not None:
            config.update(nats_accounts(self.orgs))
        return config

    # -- addresses ------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """Client URLs of every node."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """Every client URL, comma-separated (for ``--server`` / ``Settings.nats_url``)."""
        return ",".join(self.urls)

    def index_of(self, server_name: str) -> int:
        """The index of the node called ``server_name`` (``n1`` → 0)."""
        for i, node in enumerate(self.nodes):
            if node.name == server_name:
                return i
        raise KeyError(f"no node named {server_name!r} in cluster {self.name}")

    # -- lifecycle --------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Self:
        """Start every node and wait until JetStream has a meta leader all nodes agree on."""
        for node in self.nodes:
            node.start()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every running node is healthy and knows the same meta leader."""
        running = [n for n in self.nodes if n.running]

        def ready() -> bool:
            leaders = set()
            for node in running:
                health = node.monitor("healthz")
                if not health or health.get("status") != "ok":
                    return False
                jsz = node.monitor("jsz") or {}
                leaders.add(
                    (jsz.get("meta_cluster") or {}).get("leader", "") if self.size > 1 else "-"
                )
            return len(leaders) == 1 and "" not in leaders

        _wait(ready, timeout, f"cluster {self.name} did not elect a JetStream meta leader", running)

    def meta_leader(self) -> str | None:
        """The server name of the JetStream meta leader, as a running node reports it."""
        for node in self.nodes:
            jsz = node.monitor("jsz")
            if jsz:
                leader = (jsz.get("meta_cluster") or {}).get("leader")
                if leader:
                    return str(leader)
        return None

    def stop(self) -> None:
        """Stop every node and remove a temp store."""
        for node in self.nodes:
            node.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def kill(self, index: int) -> None:
        """SIGKILL node ``index`` (its store is kept for :meth:`restart`)."""
        self.nodes[index].kill()

    def restart(self, index: int, timeout: float = 30.0) -> None:
        """Start node ``index`` again (same ports, same store) and wait until it is healthy."""
        node = self.nodes[index]
        node.stop()
        node.start()
        _wait(
            lambda: (node.monitor("healthz") or {}).get("status") == "ok",
            timeout,
            f"node {node.name} did not rejoin",
            [node],
        )

    async def stream_leader(self, js: JetStreamContext, stream: str) -> int:
        """The index of the node leading ``stream`` (its Raft group's leader)."""
        info = await js.stream_info(stream)
        leader = info.cluster.leader if info.cluster else None
        if not leader:
            raise DeadliftError(f"stream {stream} has no leader right now")
        return self.index_of(leader)


# -- hub and leaf nodes ---------------------------------------------------------


def leaf_user(org: str) -> str:
    """The hub user an org's leaf node connects as (and its certificate's name)."""
    return f"{org}-leaf"


def hub_config(
    manifest: OrgManifest,
    *,
    host: str,
    port: int,
    monitor_port: int,
    leaf_port: int,
    leaf_passwords: dict[str, str],
    tls: TlsFiles,
) -> dict[str, Any]:
    """The hub: every org's account with its exports and imports, and a leaf listener.

    Each org's leaf connection must present a certificate of the hub's CA (``tls``:
    the hub's own certificate and that CA) and authenticate as ``<org>-leaf`` with
    its password; it is bound to the org's account, so what an org's own server
    publishes enters the hub in that account, and crosses to another org only
    through a declared export. The hub runs no JetStream (the orgs' servers keep
    their own) and has no client users: nobody logs in to an org's hub account.
    """
    accounts = nats_accounts(manifest)
    org_accounts = {account_name(org) for org in manifest.orgs}
    for name, account in accounts["accounts"].items():
        if name in org_accounts:
            account.pop("jetstream", None)
            account.pop("users", None)
    return {
        "server_name": "hub",
        "listen": f"{host}:{port}",
        "http": f"{MONITOR_HOST}:{monitor_port}",
        **accounts,
        "leafnodes": {
            "listen": f"{host}:{leaf_port}",
            "tls": tls.listener(),
            "authorization": {
                "timeout": TLS_TIMEOUT_S,
                "users": [
                    {"user": leaf_user(org), "password": password, "account": account_name(org)}
                    for org, password in leaf_passwords.items()
                ],
            },
        },
    }


def org_server_config(
    manifest: OrgManifest,
    org: str,
    *,
    host: str,
    port: int,
    monitor_port: int,
    store_dir: Path,
    hub_leaf_url: str,
    leaf_password: str,
    tls: TlsFiles,
) -> dict[str, Any]:
    """An org's own server: its account (users and permissions from the manifest),
    JetStream in its own domain, and a leaf connection to the hub bound to that
    account, over TLS (``tls``: the org's leaf certificate and the hub's CA).
    """
    own = manifest.model_copy(update={"orgs": {org: _local_org(manifest, org)}})
    accounts = nats_accounts(own)
    # What arrives from other orgs comes over the leaf connection only: the org's
    # own users may read those subjects, never publish on them.
    imported = [i.local_subject for i in manifest.org(org).imports]
    if imported:
        for entry in accounts["accounts"][account_name(org)].get("users", []):
            publish = entry.setdefault("permissions", {}).setdefault("publish", {})
            publish["deny"] = list(dict.fromkeys([*publish.get("deny", []), *imported]))
    user = urllib.parse.quote(leaf_user(org), safe="")
    password = urllib.parse.quote(leaf_password, safe="")
    return {
        "server_name": f"{org}-server",
        "listen": f"{host}:{port}",
        "http": f"{MONITOR_HOST}:{monitor_port}",
        # A domain per org: JetStream API requests stay on the org's own server.
        "jetstream": {"store_dir": str(store_dir), "domain": org},
        **accounts,
        "leafnodes": {
            "reconnect": "1s",
            "remotes": [
                {
                    "url": hub_leaf_url.replace("://", f"://{user}:{password}@", 1),
                    "account": account_name(org),
                    "tls": tls.remote(),
                }
            ],
        },
    }


def _local_org(manifest: OrgManifest, org: str) -> Any:
    """The org as its own server sees it: the other orgs live elsewhere (behind the hub).

    Imports become plain subjects of the org's own account (the hub delivers them
    over the leaf connection), exports need no declaration locally.
    """
    declared = manifest.org(org)
    imported = [i.local_subject for i in declared.imports]
    return declared.model_copy(
        update={"imports": [], "exports": [], "subjects": [*declared.subjects, *imported]}
    )


class LeafTopology(Managed):
    """A hub nats-server and one nats-server per org, each a leaf node of the hub.

    The leaf connections use TLS both ways with certificates of a CA made for
    this topology (``<store_dir>/tls``) and a random password per org.

    Args:
        manifest: the org manifest (accounts, exports, imports, users).
        orgs: the orgs that get their own server (default: every org).
        store_dir: parent directory for configs, logs and stores (temp if None).
    """

    def __init__(
        self,
        manifest: OrgManifest,
        orgs: list[str] | None = None,
        *,
        store_dir: str | Path | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.manifest = manifest
        self.host = host
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="deadlift-leaf-")
            store_dir = self._tmp.name
        self.store_dir = Path(store_dir)
        self.store_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        members = orgs or list(manifest.orgs)
        self.leaf_passwords = {org: new_password() for org in members}
        self.ca = CertificateAuthority(self.store_dir / "tls", name="deadlift leaf CA")
        leaf_port = free_port()
        self.leaf_port = leaf_port
        self.leaf_url = f"nats-leaf://{host}:{leaf_port}"
        self.hub = NatsProcess(
            name="hub",
            port=free_port(),
            monitor_port=free_port(),
            workdir=self.store_dir,
            host=host,
        )
        self.hub.config = hub_config(
            manifest,
            host=host,
            port=self.hub.port,
            monitor_port=self.hub.monitor_port,
            leaf_port=leaf_port,
            leaf_passwords=self.leaf_passwords,
            tls=self.ca.issue("hub", hosts=[host, "localhost"]),
        )
        self.servers: dict[str, NatsProcess] = {}
        for org in members:
            server = NatsProcess(
                name=org,
                port=free_port(),
                monitor_port=free_port(),
                workdir=self.store_dir,
                host=host,
            )
            server.config = org_server_config(
                manifest,
                org,
                host=host,
                port=server.port,
                monitor_port=server.monitor_port,
                store_dir=self.store_dir / f"{org}-store",
                hub_leaf_url=self.leaf_url,
                leaf_password=self.leaf_passwords[org],
                tls=self.ca.issue(leaf_user(org)),
            )
            self.servers[org] = server

    def url(self, org: str) -> str:
        """The client URL of ``org``'s own server."""
        return self.servers[org].url

    @property
    def processes(self) -> list[NatsProcess]:
        return [self.hub, *self.servers.values()]

    def start(self, timeout: float = 30.0) -> Self:
        """Start the hub and the orgs' servers; wait until every leaf connection is up."""
        try:
            for process in self.processes:
                process.start()
            want = len(self.servers)

            def ready() -> bool:
                leafz = self.hub.monitor("leafz") or {}
                healthy = all(
                    (s.monitor("healthz") or {}).get("status") == "ok"
                    for s in self.servers.values()
                )
                return healthy and int(leafz.get("leafnodes", 0)) >= want

            _wait(ready, timeout, f"{want} leaf node(s) did not connect to the hub", self.processes)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every server and remove a temp directory."""
        for process in reversed(self.processes):
            process.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
