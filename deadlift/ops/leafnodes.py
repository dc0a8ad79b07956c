"""A hub nats-server with one leaf-node server per org, on loopback.

:class:`LeafTopology` runs a hub server and one server per org, each org's
server connected to the hub by a leaf-node connection bound to that org's hub
account: each organization keeps its own NATS (and JetStream, in its own
domain), and events cross only through the hub's account exports and imports.

A leaf connection must present a certificate of the topology's own CA (mutual
TLS, see :mod:`deadlift.ops.tls`) *and* a password generated per org for this
topology — nothing ships one. Monitoring, which has no authentication, listens
on 127.0.0.1 only. The hand-written equivalent for real machines is in
``deploy/leafnodes/``.
"""

from __future__ import annotations

import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Self

from deadlift.model.orgs import OrgManifest, account_name, nats_accounts
from deadlift.ops.cluster import MONITOR_HOST, NatsProcess, new_password, wait_for
from deadlift.ops.server import Managed, free_port
from deadlift.ops.tls import TLS_TIMEOUT_S, CertificateAuthority, TlsFiles


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
    own = manifest.model_copy(update={"orgs": {org: _local_org(manifest, org)}, "integrations": {}})
    accounts = nats_accounts(own)
    # What arrives from other orgs comes over the leaf connection only: the org's
    # own users may read those subjects, never publish on them.
    imported = manifest.import_subjects(org)
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
    imported = manifest.import_subjects(org)
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

            wait_for(
                ready, timeout, f"{want} leaf node(s) did not connect to the hub", self.processes
            )
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
