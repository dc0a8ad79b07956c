"""The nats-server configs Deadlift renders for a cluster and a leaf topology, started never.

Routes and leaf connections need a certificate of the topology's own CA and a
password generated for it; monitoring stays on loopback; files holding passwords
are the owner's only. The attacks on running servers are in
tests/integration/test_attack_cluster.py.
"""

from __future__ import annotations

import stat
from pathlib import Path

from deadlift.model.orgs import account_name, load_orgs
from deadlift.ops.cluster import MONITOR_HOST, ROUTE_USER, LocalCluster
from deadlift.ops.leafnodes import LeafTopology, leaf_user
from tests.conftest import ROOT

MANIFEST = load_orgs(ROOT / "config" / "orgs.yaml")


def test_routes_get_tls_and_a_fresh_password_and_monitoring_stays_on_loopback(
    tmp_path: Path,
) -> None:
    one = LocalCluster(3, store_dir=tmp_path / "one", orgs=MANIFEST, host="0.0.0.0")
    two = LocalCluster(3, store_dir=tmp_path / "two", orgs=MANIFEST)
    assert one.route_password != two.route_password  # generated per cluster, never shipped
    assert len(one.route_password) >= 24
    for cluster in (one, two):
        for node in cluster.nodes:
            config = node.config
            # Monitoring has no authentication: loopback only, even for a cluster on 0.0.0.0.
            assert config["http"].startswith(f"{MONITOR_HOST}:")
            assert node.monitor_url.startswith(f"http://{MONITOR_HOST}:")
            routes = config["cluster"]
            assert routes["authorization"] == {
                "user": ROUTE_USER,
                "password": cluster.route_password,
                "timeout": 2,
            }
            assert routes["tls"]["verify"] is True  # peers must present a cert of this CA
            assert Path(routes["tls"]["ca_file"]) == cluster.store_dir / "tls" / "ca.pem"
            assert all(f":{cluster.route_password}@" in url for url in routes["routes"])
            config_file = node.write_config()
            # The config holds the route password and the orgs' passwords: owner only.
            assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
            assert stat.S_IMODE(Path(routes["tls"]["key_file"]).stat().st_mode) == 0o600
    topology = LeafTopology(MANIFEST, ["acme", "stripe"], store_dir=tmp_path / "leaf")
    leaf = topology.hub.config["leafnodes"]
    assert leaf["tls"]["verify"] is True
    passwords = {u["user"]: u["password"] for u in leaf["authorization"]["users"]}
    assert passwords == {leaf_user(o): topology.leaf_passwords[o] for o in ("acme", "stripe")}
    assert not any(p.endswith("-dev") for p in passwords.values())
    for process in topology.processes:
        assert process.config["http"].startswith(f"{MONITOR_HOST}:")
    # The hub has no client users in the orgs' accounts: nobody logs in there.
    for org in MANIFEST.orgs:
        assert "users" not in topology.hub.config["accounts"][account_name(org)]
