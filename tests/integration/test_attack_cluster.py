"""Attacks on the NATS topology Deadlift renders: a rogue server on the cluster port,
a rogue leaf node at the hub. Real nats-servers on loopback, nothing mocked.

Every attack is paired with a control — a server with the credentials the real
nodes have — that does join and does see the traffic, so "nothing arrived"
means the attacker was refused, not that the test could not have noticed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from deadlift.model.orgs import account_name, load_orgs
from deadlift.ops.cluster import ROUTE_USER, LocalCluster, NatsProcess
from deadlift.ops.leafnodes import LeafTopology, leaf_user
from deadlift.ops.server import free_port
from deadlift.ops.tls import CertificateAuthority, TlsFiles
from tests.conftest import ROOT, eventually

pytestmark = pytest.mark.slow
MANIFEST = load_orgs(ROOT / "config" / "orgs.yaml")
NODES = {"n1", "n2", "n3"}


def spy_accounts() -> dict[str, Any]:
    """What an attacker's server declares: the orgs' account names (they are no secret),
    each with a user of the attacker's own and no permission limits."""
    accounts: dict[str, Any] = {
        account_name(org): {"users": [{"user": f"spy-{org}", "password": "spy"}]}
        for org in MANIFEST.orgs
    }
    return {"accounts": {**accounts, "SYS": {}}, "system_account": "SYS"}


def org_user(org: str) -> dict[str, str]:
    [user, *_] = [u for u in MANIFEST.org(org).users if u.user and u.password]
    assert user.user and user.password
    return {"user": user.user, "password": user.password}


class Inbox:
    """Every message a subscription received, by subject."""

    def __init__(self) -> None:
        self.messages: list[Msg] = []

    async def on_message(self, msg: Msg) -> None:
        self.messages.append(msg)

    def subjects(self, prefix: str = "") -> list[str]:
        return [m.subject for m in self.messages if m.subject.startswith(prefix)]


async def listen(url: str, subject: str, **credentials: str) -> tuple[Client, Inbox]:
    nc = await nats.connect(url, name="deadlift-attack-test", **credentials)
    inbox = Inbox()
    await nc.subscribe(subject, cb=inbox.on_message)
    await nc.flush()
    return nc, inbox


def stop_all(processes: list[NatsProcess]) -> None:
    for process in processes:
        process.stop()  # SIGTERM (then SIGKILL) of that process's PID only


def log_of(process: NatsProcess) -> str:
    return process.log_file.read_text(errors="replace") if process.log_file.exists() else ""


# -- a rogue server on the cluster port -----------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(3, store_dir=tmp_path / "cluster", orgs=MANIFEST) as running:
        yield running


def would_be_route(
    cluster: LocalCluster, workdir: Path, name: str, *, password: str | None, tls: TlsFiles | None
) -> NatsProcess:
    """A nats-server that dials every node's cluster port, with what the attacker has."""
    process = NatsProcess(
        name=name, port=free_port(), monitor_port=free_port(), workdir=workdir / name
    )
    credentials = f"{ROUTE_USER}:{password}@" if password else ""
    routes: dict[str, Any] = {
        "name": cluster.name,
        "listen": f"127.0.0.1:{free_port()}",
        "routes": [f"nats-route://{credentials}127.0.0.1:{p}" for p in cluster.route_ports],
    }
    if tls is not None:
        # It presents its certificate and, being the attacker, trusts whatever the
        # nodes present: only the nodes' own checks stand in its way.
        routes["tls"] = {**tls.remote(), "insecure": True}
    process.config = {
        "server_name": name,
        "listen": f"127.0.0.1:{process.port}",
        "http": f"127.0.0.1:{process.monitor_port}",
        "cluster": routes,
        **spy_accounts(),
    }
    return process


def route_names(node: NatsProcess) -> set[str]:
    routez = node.monitor("routez") or {}
    return {str(r.get("remote_name")) for r in routez.get("routes") or []}


def refused_by_every_node(cluster: LocalCluster, process: NatsProcess) -> bool:
    """The attacker's own log shows it reached every node's cluster port and was dropped."""
    lines = log_of(process).splitlines()
    return all(
        any(f"127.0.0.1:{port}" in line and ("closed" in line or "rror" in line) for line in lines)
        for port in cluster.route_ports
    )


def route_attackers(cluster: LocalCluster, workdir: Path) -> list[NatsProcess]:
    """Each attacker has one piece of what a node has, or none."""
    assert cluster.ca is not None
    attacker_ca = CertificateAuthority(workdir / "attacker-ca")
    return [
        would_be_route(cluster, workdir, "no-credentials", password=None, tls=None),
        # The route password Deadlift's configs used to ship, a certificate of its own CA.
        would_be_route(
            cluster,
            workdir,
            "guessed-password",
            password="route-dev",
            tls=attacker_ca.issue("guessed-password", hosts=["127.0.0.1"]),
        ),
        # The password leaked, but no certificate of the cluster's CA.
        would_be_route(
            cluster,
            workdir,
            "leaked-password",
            password=cluster.route_password,
            tls=attacker_ca.issue("leaked-password", hosts=["127.0.0.1"]),
        ),
        # A certificate of the cluster's CA leaked, but not the password.
        would_be_route(
            cluster,
            workdir,
            "stolen-certificate",
            password="not-the-password",
            tls=cluster.ca.issue("stolen-certificate", hosts=["127.0.0.1"]),
        ),
    ]


async def spy_on(processes: list[NatsProcess], clients: list[Client]) -> dict[str, Inbox]:
    """On each server, a client of acme's account there subscribed to everything."""
    spies: dict[str, Inbox] = {}
    for process in processes:
        nc, spies[process.name] = await listen(process.url, ">", user="spy-acme", password="spy")
        clients.append(nc)
    return spies


async def test_a_rogue_server_on_the_cluster_port_never_becomes_a_route_and_sees_or_injects_nothing(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    assert cluster.ca is not None
    attackers = route_attackers(cluster, tmp_path)
    # The control: everything a node has. It joins, and sees acme's traffic.
    joiner = would_be_route(
        cluster,
        tmp_path,
        "joiner",
        password=cluster.route_password,
        tls=cluster.ca.issue("joiner", hosts=["127.0.0.1"]),
    )
    clients: list[Client] = []
    try:
        for process in [*attackers, joiner]:
            process.start()
        await eventually(
            lambda: all("joiner" in route_names(n) for n in cluster.nodes),
            timeout=15,
            message="the control server joined every node",
        )
        # A refused route is retried on nats-server's own schedule: on a busy machine
        # the last attacker's first try at the last node took longer than 15 s once
        # (a fresh-clone `make test`). Waiting longer weakens nothing: the checks
        # below assert that no attacker ever became a route or saw a message.
        await eventually(
            lambda: all(refused_by_every_node(cluster, a) for a in attackers),
            timeout=45,
            message="every attacker dialled every node and was dropped",
        )
        spies = await spy_on([*attackers, joiner], clients)
        # Acme's real traffic: published on n1, received on n3 across the real routes.
        publisher = await nats.connect(cluster.nodes[0].url, **org_user("acme"))
        receiver, received = await listen(cluster.nodes[2].url, "acme.>", **org_user("acme"))
        clients += [publisher, receiver]

        async def through(*inboxes: Inbox) -> bool:
            await publisher.publish("acme.secret.warmup", b"interest settles")
            await publisher.flush()
            return all(inbox.subjects("acme.secret") for inbox in inboxes)

        await eventually(lambda: through(received, spies["joiner"]), timeout=10)
        for n in range(20):
            await publisher.publish(f"acme.secret.{n}", b"customer data")
        await publisher.flush()
        await eventually(
            lambda: (
                len(received.subjects("acme.secret.1")) >= 11  # .1 and .10-.19
                and len(spies["joiner"].subjects("acme.secret.1")) >= 11
            ),
            timeout=10,
            message="the real receiver and the control got the burst",
        )

        # Injection: every attacker publishes into acme's account on its own server.
        for attacker in attackers:
            injector = await nats.connect(attacker.url, user="spy-acme", password="spy")
            clients.append(injector)
            for n in range(20):
                await injector.publish(f"acme.injected.{attacker.name}.{n}", b"fake order")
            await injector.flush()
        # The control's injection does arrive: it is the barrier after the attackers'.
        control = await nats.connect(joiner.url, user="spy-acme", password="spy")
        clients.append(control)

        async def barrier() -> bool:
            await control.publish("acme.injected.joiner", b"through the real route")
            await control.flush()
            return bool(received.subjects("acme.injected.joiner"))

        await eventually(barrier, timeout=10, message="the control's publish reached n3")
        await asyncio.sleep(0.3)
        await receiver.flush()

        for attacker in attackers:
            # All it ever saw is what it published itself on its own server.
            own = f"acme.injected.{attacker.name}."
            seen = [s for s in spies[attacker.name].subjects() if not s.startswith(own)]
            assert seen == [], f"{attacker.name} read acme's traffic: {seen[:3]}"
        injected = {s.split(".")[2] for s in received.subjects("acme.injected.")}
        assert injected == {"joiner"}, f"injected into the real cluster by {injected}"
        for node in cluster.nodes:
            assert route_names(node) <= {*NODES, "joiner"}, node.name
            assert route_names(node) >= NODES - {node.name}
        for attacker in attackers:
            assert (attacker.monitor("routez") or {}).get("num_routes") == 0, attacker.name
        # Why: the nodes ended the TLS handshakes of servers without a certificate of
        # the cluster's CA, and the password check refused the stolen certificate.
        logs = "\n".join(log_of(n) for n in cluster.nodes)
        assert "TLS route handshake error" in logs
        assert "Authorization Violation" in log_of(attackers[3])
        stop_all([*attackers, joiner])
        await asyncio.to_thread(cluster.wait_ready, 15)  # the cluster is still healthy
    finally:
        for nc in clients:
            if not nc.is_closed:
                await nc.close()
        stop_all([*attackers, joiner])


# -- a rogue leaf node at the hub ----------------------------------------------------------


def would_be_leaf(
    topology: LeafTopology, workdir: Path, name: str, *, password: str, tls: TlsFiles | None
) -> NatsProcess:
    """A nats-server that dials the hub's leaf port as acme's leaf node."""
    process = NatsProcess(
        name=name, port=free_port(), monitor_port=free_port(), workdir=workdir / name
    )
    remote: dict[str, Any] = {
        "url": f"nats-leaf://{leaf_user('acme')}:{password}@127.0.0.1:{topology.leaf_port}",
        "account": account_name("acme"),
    }
    if tls is not None:
        remote["tls"] = {**tls.remote(), "insecure": True}  # the attacker trusts any hub
    process.config = {
        "server_name": name,
        "listen": f"127.0.0.1:{process.port}",
        "http": f"127.0.0.1:{process.monitor_port}",
        "leafnodes": {"reconnect": "1s", "remotes": [remote]},
        **spy_accounts(),
    }
    return process


def leaf_names(topology: LeafTopology) -> list[str]:
    leafz = topology.hub.monitor("leafz") or {}
    return sorted(str(leaf.get("name")) for leaf in leafz.get("leafs") or [])


async def test_a_rogue_leaf_node_at_the_hub_is_refused_and_receives_nothing_for_acme(
    tmp_path: Path,
) -> None:
    with LeafTopology(MANIFEST, ["acme", "stripe"], store_dir=tmp_path / "leaf") as topology:
        attacker_ca = CertificateAuthority(tmp_path / "attacker-ca")
        password = topology.leaf_passwords["acme"]
        attackers = [
            # The leaf password deploy/leafnodes used to ship, over plain TCP.
            would_be_leaf(
                topology, tmp_path, "shipped-password", password="acme-leaf-dev", tls=None
            ),
            would_be_leaf(
                topology,
                tmp_path,
                "leaked-password",
                password=password,
                tls=attacker_ca.issue("leaked-password"),
            ),
            would_be_leaf(
                topology,
                tmp_path,
                "stolen-certificate",
                password="not-the-password",
                tls=topology.ca.issue("stolen-certificate"),
            ),
        ]
        joiner = would_be_leaf(
            topology, tmp_path, "joiner", password=password, tls=topology.ca.issue("joiner")
        )
        clients: list[Client] = []
        try:
            for process in [*attackers, joiner]:
                process.start()
            await eventually(
                lambda: "joiner" in leaf_names(topology), timeout=15, message="control joined"
            )
            await eventually(
                lambda: all("closed" in log_of(a) or "rror" in log_of(a) for a in attackers),
                timeout=15,
                message="every attacker dialled the hub and was dropped",
            )
            spies = await spy_on([*attackers, joiner], clients)
            acme, received = await listen(topology.url("acme"), "acme.in.>", **org_user("acme"))
            stripe = await nats.connect(topology.url("stripe"), **org_user("stripe"))
            clients += [acme, stripe]

            async def crossed() -> bool:
                await stripe.publish("stripe.out.acme.discounts", b"10% off for alice")
                await stripe.flush()
                return bool(received.messages) and bool(spies["joiner"].messages)

            await eventually(crossed, timeout=15, message="stripe's export reached acme")
            await asyncio.sleep(0.3)
            for attacker in attackers:
                assert spies[attacker.name].messages == [], f"{attacker.name} read acme's import"
            assert leaf_names(topology) == sorted(["acme-server", "stripe-server", "joiner"])
            leafz = json.dumps(topology.hub.monitor("leafz"))
            assert not any(a.name in leafz for a in attackers)
        finally:
            for nc in clients:
                if not nc.is_closed:
                    await nc.close()
            stop_all([*attackers, joiner])
