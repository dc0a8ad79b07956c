"""deploy/ validated offline: files parse, commands are valid ``deadlift`` invocations,
Kubernetes objects are well-formed (schema-checked with kubernetes-validate),
generated copies match config/, production files are closed by default (no
example Secret or development password applied, each org's Secret only in that
org's pods, network policies, monitoring unexposed, routes and leaf nodes with
TLS and authorization), and the static nats-server configs really run: the
loopback cluster elects a leader and refuses a stranger, the leaf nodes carry an event.
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import nats
import pytest
import yaml
from click.testing import CliRunner

from deadlift.cli import main
from deadlift.model.orgs import OrgManifest, account_name, load_orgs, render_nats_config
from deadlift.model.topology import consumer_name
from deadlift.model.workflow import parse_workflow
from deadlift.ops.cluster import LocalCluster
from deadlift.ops.leafnodes import LeafTopology
from deadlift.ops.server import free_port, nats_server_binary
from deadlift.ops.tls import CertificateAuthority
from deadlift.settings import Settings
from deadlift.wasm.hostfns import load_pack
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_DEV = DEPLOY / "examples" / "k8s-dev"
COMPOSE = DEPLOY / "compose"
SYSTEMD = DEPLOY / "systemd"
LEAFNODES = DEPLOY / "leafnodes"
# What a production operator applies or installs as is: closed by default, no
# development password. deploy/nats, deploy/compose and deploy/examples are for
# development and say so.
PRODUCTION = [K8S, SYSTEMD, LEAFNODES]
ROUTE_IDENTITY = "CN=deadlift-route"
ORGS = load_orgs(ROOT / "config" / "orgs.yaml")
WORKFLOWS = {p.name: p for p in sorted((ROOT / "config" / "workflows").glob("*.yaml"))}
# Environment variables the CLI reads besides the Settings fields (DEADLIFT_<FIELD>).
CLI_ENV = {"DEADLIFT_LOG_FORMAT", "DEADLIFT_HOST_FUNCTIONS", "DEADLIFT_ORGS_FILE"}


def yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomize(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The objects ``kubectl apply -k DIRECTORY`` applies: its resources, files or
    kustomizations, recursively, and its generated Secrets (these kustomizations
    use nothing else)."""
    [kustomization] = yaml_docs(directory / "kustomization.yaml")
    assert set(kustomization) <= {
        "apiVersion",
        "kind",
        "namespace",
        "resources",
        "images",
        "secretGenerator",
    }
    objects = []
    for resource in kustomization["resources"]:
        path = (directory / resource).resolve()
        if path.is_dir():
            objects += kustomize(path)
        else:
            objects += [(path, doc) for doc in yaml_docs(path)]
    for generator in kustomization.get("secretGenerator", []):
        assert set(generator) == {"name", "files", "options"}
        assert generator["options"]["disableNameSuffixHash"] is True
        files = [directory / name for name in generator["files"]]
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": generator["name"], "labels": generator["options"]["labels"]},
            "type": "Opaque",
            "stringData": {f.name: f.read_text() for f in files},
        }
        objects += [(files[0], secret)]
    return objects


def k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    """The default build: what `kubectl apply -k deploy/k8s` applies."""
    return kustomize(K8S)


# -- deadlift invocations -----------------------------------------------------------


def localize(arg: str) -> str:
    """Paths inside the containers → this checkout (the image has config/ and workers/)."""
    if arg.startswith("/etc/deadlift/"):
        name = arg.removeprefix("/etc/deadlift/")
        return str(WORKFLOWS[name]) if name in WORKFLOWS else f"config/{name}"
    return arg


def check_invocation(argv: list[str]) -> list[str]:
    """Parse ``deadlift ARGS…`` with the real click command tree, without running it.

    Returns the command path (e.g. ``["module", "push"]``). Options are type-checked
    and files must exist (paths resolved in this checkout).
    """
    assert argv and Path(argv[0]).name == "deadlift", argv
    args = [localize(a) for a in argv[1:]]
    path: list[str] = []
    command: click.Command = main
    ctx = main.make_context("deadlift", args)
    while isinstance(command, click.Group):
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        assert rest, f"{argv}: no subcommand"
        name, sub, sub_args = command.resolve_command(ctx, rest)
        assert sub is not None and name is not None, argv
        path.append(name)
        command = sub
        ctx = sub.make_context(name, sub_args, parent=ctx)
    for pack in ctx.params.get("packs") or ():
        assert load_pack(pack), f"{argv}: host function pack {pack} offers nothing"
    return path


def shell_lines(script: str) -> list[list[str]]:
    return [shlex.split(line) for line in script.splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def _in_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # relative paths in commands (workers/dist/…, config/…)


def test_every_yaml_file_under_deploy_parses() -> None:
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(files) >= 10
    for path in files:
        docs = yaml_docs(path)
        assert docs, f"{path}: empty"
        assert all(isinstance(doc, dict) for doc in docs), path


def test_check_invocation_refuses_what_the_cli_refuses() -> None:
    assert check_invocation(["deadlift", "--org", "acme", "worker", "-c", "4"]) == ["worker"]
    with pytest.raises(click.UsageError):
        check_invocation(["deadlift", "worker", "--no-such-flag"])
    with pytest.raises(click.UsageError):
        check_invocation(["deadlift", "module", "push", "workers/dist/nope.wasm"])


# -- docker compose -------------------------------------------------------------------


def compose() -> dict[str, Any]:
    [doc] = yaml_docs(COMPOSE / "docker-compose.yml")
    return dict(doc)


def test_compose_runs_a_three_node_cluster_and_two_workers_per_org() -> None:
    services = compose()["services"]
    assert {"nats-1", "nats-2", "nats-3", "worker-acme", "worker-stripe"} <= set(services)
    # The routes' CA and certificates: made by a one-shot service, kept in a volume.
    certs = services["certs"]
    assert certs["command"][:2] == ["sh", "-ec"]
    [make] = [line for line in shell_lines(certs["command"][2]) if "deadlift" in line]
    make = make[make.index("deadlift") :]
    assert check_invocation(make) == ["certs"]
    assert make[-2:] == ["--common-name", ROUTE_IDENTITY.removeprefix("CN=")]
    assert "tls:/tls" in certs["volumes"] and certs["depends_on"] == {}
    for name in ("nats-1", "nats-2", "nats-3"):
        nats_service = services[name]
        assert nats_service["image"].startswith("nats:")
        assert nats_service["environment"]["SERVER_NAME"] == name
        assert nats_service["environment"]["ROUTE_CERT"] == f"/tls/{name}.pem"
        assert name in make  # a certificate is made for it
        assert "tls:/tls:ro" in nats_service["volumes"]
        assert nats_service["depends_on"] == {
            "certs": {"condition": "service_completed_successfully"}
        }
        assert "wget" in nats_service["healthcheck"]["test"]
        assert any(v.endswith(":/data") for v in nats_service["volumes"])
        for volume in nats_service["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).is_file(), volume
    for org in ("acme", "stripe"):
        worker = services[f"worker-{org}"]
        assert check_invocation(worker["command"]) == ["worker"]
        assert worker["command"][1:3] == ["--org", org]
        assert worker["deploy"]["replicas"] >= 2
        health = worker["healthcheck"]["test"]
        assert health[0] == "CMD" and check_invocation(health[1:]) == ["health"]
        env = worker["environment"]
        settings = Settings(
            nats_url=env["DEADLIFT_NATS_URL"], stream_replicas=env["DEADLIFT_STREAM_REPLICAS"]
        )
        assert settings.stream_replicas == 3
        hosts = re.findall(r"nats://([\w-]+):4222", settings.nats_url)
        assert hosts == ["nats-1", "nats-2", "nats-3"]
        setup = services[f"setup-{org}"]
        assert worker["depends_on"] == {
            f"setup-{org}": {"condition": "service_completed_successfully"}
        }
        assert setup["command"][:2] == ["sh", "-ec"]
        commands = [check_invocation(line) for line in shell_lines(setup["command"][2])]
        assert ["module", "push"] in commands and ["workflow", "apply"] in commands
        assert {d: c["condition"] for d, c in setup["depends_on"].items()} == {
            f"nats-{i}": "service_healthy" for i in (1, 2, 3)
        }


def test_compose_builds_the_worker_image_from_this_checkout() -> None:
    build = compose()["services"]["worker-acme"]["build"]
    assert (COMPOSE / build["context"] / build["dockerfile"]).resolve() == COMPOSE / "Dockerfile"
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM python:3.11-slim" in dockerfile
    assert "pip install ." in dockerfile
    for copied in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (ROOT / copied).exists(), copied
    cmd = json.loads(re.search(r"^CMD (.+)$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    assert check_invocation(cmd) == ["worker"]


# -- Kubernetes -----------------------------------------------------------------------


def test_kubernetes_objects_are_well_formed_and_of_the_expected_kinds() -> None:
    objects = k8s_objects()
    kinds = {doc["kind"] for _, doc in objects}
    assert kinds == {
        "Namespace",
        "ConfigMap",
        "Issuer",
        "Certificate",
        "NetworkPolicy",
        "Job",
        "Deployment",
        "PodDisruptionBudget",
        "ScaledObject",
    }
    for path, doc in objects:
        assert doc.get("apiVersion") and doc.get("kind"), path
        assert re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", doc["metadata"]["name"]), path
    # Every manifest in deploy/k8s is applied by default, and nothing else is.
    listed = {p.name for p, _ in objects}
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "nats-values.yaml"}
    assert listed == present


def test_the_default_build_applies_no_secret_and_no_development_password() -> None:
    """Example Secrets and dev passwords live in deploy/examples/k8s-dev, never in the base."""
    objects = k8s_objects()
    assert [d["metadata"]["name"] for _, d in objects if d["kind"] == "Secret"] == []
    assert all(K8S_DEV not in p.parents for p, _ in objects)
    for path, doc in objects:
        for key, value in walk(doc):
            assert not (isinstance(value, str) and DEV_PASSWORD.search(f"{key}: {value}")), (
                path.name,
                key,
            )
    # The development overlay is the production base plus Secrets, and says so loudly.
    dev = kustomize(K8S_DEV)
    assert {d["metadata"]["name"] for _, d in dev if d["kind"] == "Secret"} == {
        "deadlift-org-acme",
        "deadlift-org-stripe",
        "deadlift-nats-accounts",
    }
    assert [d for _, d in dev if d["kind"] != "Secret"] == [d for _, d in objects]
    for path in K8S_DEV.glob("*.yaml"):
        assert "DEVELOPMENT ONLY" in path.read_text(), path
    [accounts] = [d for _, d in dev if d["metadata"]["name"] == "deadlift-nats-accounts"]
    assert accounts["stringData"]["accounts.conf"] == render_nats_config(ORGS)


DEV_PASSWORD = re.compile(r"(?i)(password|secret|token)\S*\s*[:=]\s*[\"']?[\w.-]*-dev\b")


# Every development credential Deadlift ships or shipped: the manifest's passwords
# and secret values, and the leaf, system and route passwords of older configs.
DEV_VALUES = {
    *(u.password for org in ORGS.orgs.values() for u in org.users if u.password),
    *(s.value for org in ORGS.orgs.values() for s in org.secrets.values() if s.value),
    *(f"{org}-leaf-dev" for org in ORGS.orgs),
    "sys-dev",
    "route-dev",
}


def walk(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """Every (key, leaf value) of a parsed document."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, str(k))
    elif isinstance(value, list):
        for item in value:
            yield from walk(item, key)
    else:
        yield key, value


def test_no_production_file_holds_a_development_password() -> None:
    checked = 0
    for root in PRODUCTION:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            text = path.read_text()
            found = DEV_PASSWORD.findall(text) + [
                v for v in DEV_VALUES if re.search(rf"(?<![\w-]){re.escape(v)}(?![\w-])", text)
            ]
            assert found == [], f"{path.relative_to(ROOT)}: {found}"
            checked += 1
    assert checked >= 15
    # The development files that do hold them say so where a reader looks first.
    for path in [COMPOSE / "docker-compose.yml", *sorted((DEPLOY / "nats").glob("n*.conf"))]:
        assert "DEVELOPMENT" in path.read_text().split("\n\n")[0], path


def test_kubernetes_objects_pass_the_official_schemas() -> None:
    import kubernetes_validate as validator  # a dev dependency: make test installs it

    for path, doc in k8s_objects():
        if doc["apiVersion"].startswith(("keda.sh/", "cert-manager.io/")):
            continue  # CRDs: checked structurally below
        try:
            validator.validate(doc, "1.31.0", strict=True)
        except validator.ValidationError as exc:
            raise AssertionError(f"{path.name}: {doc['kind']} {exc}") from None


def deployments() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in k8s_objects() if d["kind"] == "Deployment"}


def pods_of(org: str) -> list[dict[str, Any]]:
    """The pod templates that act as ``org``: its worker Deployment and its setup Job."""
    return [
        d["spec"]["template"]
        for _, d in k8s_objects()
        if d["kind"] in ("Deployment", "Job") and d["metadata"]["labels"]["deadlift.dev/org"] == org
    ]


def secrets_used(pod: dict[str, Any]) -> set[str]:
    """Every Secret a pod template reads: env, envFrom, volumes (also projected)."""
    spec = pod["spec"]
    names = set()
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        for source in container.get("envFrom", []):
            assert "configMapRef" in source or "secretRef" in source, source
            if "secretRef" in source:
                names.add(source["secretRef"]["name"])
        for env in container.get("env", []):
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
    for volume in spec.get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for source in (volume.get("projected") or {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    return names


def test_each_orgs_secret_is_mounted_only_into_that_orgs_pods() -> None:
    for org in ("acme", "stripe"):
        pods = pods_of(org)
        assert len(pods) == 2, org  # its workers and its setup Job
        for pod in pods:
            assert secrets_used(pod) == {f"deadlift-org-{org}"}, org
            assert pod["spec"]["automountServiceAccountToken"] is False
            [container] = pod["spec"]["containers"]
            # Its creds file (operator mode) is there too, for this org only.
            [volume] = [v for v in pod["spec"]["volumes"] if "secret" in v]
            mounts = {m["name"]: m for m in container["volumeMounts"]}
            assert mounts[volume["name"]]["readOnly"] is True
            assert volume["secret"]["defaultMode"] & 0o077 == 0o040  # not world-readable


def test_worker_deployments_run_deadlift_with_exec_probes() -> None:
    for org in ("acme", "stripe"):
        deployment = deployments()[f"deadlift-worker-{org}"]
        spec = deployment["spec"]["template"]["spec"]
        [container] = spec["containers"]
        assert check_invocation(container["command"]) == ["worker"]
        assert container["command"][1:3] == ["--org", org]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert check_invocation(container[probe]["exec"]["command"]) == ["health"], probe
        assert "--worker" in container["livenessProbe"]["exec"]["command"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["DEADLIFT_STREAM_REPLICAS"] == "3"
        assert set(env) <= {f"DEADLIFT_{f.upper()}" for f in Settings.model_fields} | CLI_ENV
        assert env["DEADLIFT_ORGS_FILE"] == "/etc/deadlift/orgs.yaml"
        assert [e["secretRef"]["name"] for e in container["envFrom"]] == [f"deadlift-org-{org}"]
        grace = spec["terminationGracePeriodSeconds"]
        assert grace > float(env["DEADLIFT_SHUTDOWN_TIMEOUT_S"])
        labels = deployment["spec"]["selector"]["matchLabels"]
        assert deployment["spec"]["template"]["metadata"]["labels"] == labels


# ~70-120 MB per worker process (docs/PERFORMANCE.md: 116-118 MB with 20 modules).
PROCESS_BUDGET_MB = 128


def memory_mb(quantity: str) -> float:
    """A Kubernetes or Compose memory quantity ("512Mi", "512M", "1G") in MiB."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]i?)?", quantity).groups()  # type: ignore[union-attr]
    scale = {"K": 1 / 1024, "M": 1, "G": 1024}[(unit or "M")[0]]
    return float(number) * scale


def worker_processes(command: list[str], env: dict[str, Any]) -> str | None:
    """How many processes ``deadlift worker`` runs: --processes, else DEADLIFT_PROCESSES."""
    if "--processes" in command:
        return command[command.index("--processes") + 1]
    value = env.get("DEADLIFT_PROCESSES")
    return None if value is None else str(value)


def test_worker_containers_fit_their_memory_limit_on_any_node() -> None:
    """`deadlift worker` runs one process per CPU by default (capped by a CPU quota, not
    by memory): a container with a memory limit and no CPU limit would start one per
    CPU of the node and be OOM-killed on a large one. Each sets its process count."""
    containers: list[tuple[str, list[str], dict[str, Any], str]] = []
    for org in ("acme", "stripe"):
        [container] = deployments()[f"deadlift-worker-{org}"]["spec"]["template"]["spec"][
            "containers"
        ]
        env = {e["name"]: e.get("value") for e in container["env"]}
        limit = container["resources"]["limits"]["memory"]
        containers.append((f"k8s {org}", container["command"], env, limit))
        service = compose()["services"][f"worker-{org}"]
        limit = service["deploy"]["resources"]["limits"]["memory"]
        containers.append((f"compose {org}", service["command"], service["environment"], limit))
    for name, command, env, limit in containers:
        processes = worker_processes(command, env)
        assert processes is not None and processes.isdigit(), (name, processes)
        assert int(processes) * PROCESS_BUDGET_MB <= memory_mb(limit), (name, processes, limit)


# -- network policies and monitoring ------------------------------------------------------

NATS_POD = {"app.kubernetes.io/name": "nats", "app.kubernetes.io/component": "nats"}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # matchExpressions: not used here
    return dict(selector.get("matchLabels") or {}).items() <= labels.items()


def policies_for(labels: dict[str, str]) -> list[dict[str, Any]]:
    return [
        d["spec"]
        for _, d in k8s_objects()
        if d["kind"] == "NetworkPolicy" and selects(d["spec"]["podSelector"], labels)
    ]


def allowed(policies: list[dict[str, Any]], direction: str) -> list[tuple[dict[str, Any], int]]:
    """(peer, port) pairs the policies allow in ``direction`` ("ingress"/"egress")."""
    peers = "from" if direction == "ingress" else "to"
    pairs = []
    for policy in policies:
        assert direction.capitalize() in policy["policyTypes"]
        for rule in policy.get(direction) or []:
            assert rule.get(peers) and rule.get("ports"), f"{direction} rule open to all: {rule}"
            pairs += [(peer, port["port"]) for peer in rule[peers] for port in rule["ports"]]
    return pairs


def test_network_policies_deny_by_default_and_open_only_the_ports_deadlift_needs() -> None:
    policies = [d["spec"] for _, d in k8s_objects() if d["kind"] == "NetworkPolicy"]
    assert {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]} in policies
    dns = {53}
    for org in ("acme", "stripe"):
        for pod in pods_of(org):
            mine = policies_for(pod["metadata"]["labels"])
            assert allowed(mine, "ingress") == []  # nobody connects to a worker
            egress = allowed(mine, "egress")
            assert {port for _, port in egress} == {4222, *dns}  # NATS clients and DNS only
            for peer, port in egress:
                if port == 4222:
                    assert (
                        selects(peer["podSelector"], NATS_POD) and "namespaceSelector" not in peer
                    )
    nats = policies_for(NATS_POD)
    ingress = allowed(nats, "ingress")
    assert {port for _, port in ingress} == {4222, 6222, 8222}
    worker_labels = deployments()["deadlift-worker-acme"]["spec"]["template"]["metadata"]["labels"]
    for peer, port in ingress:
        if port == 6222:  # routes: only from NATS pods of this namespace
            assert peer == {"podSelector": {"matchLabels": NATS_POD}}
        if port == 8222:  # monitoring: only from KEDA's operator
            assert peer["namespaceSelector"] == {
                "matchLabels": {"kubernetes.io/metadata.name": "keda"}
            }
            assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "keda-operator"}
        if port == 4222:
            assert selects(peer["podSelector"], worker_labels) and "namespaceSelector" not in peer
    assert {port for _, port in allowed(nats, "egress")} == {6222, *dns}


def test_monitoring_is_in_no_service_and_listens_on_loopback_where_deadlift_sets_it() -> None:
    for _, doc in [*k8s_objects(), *kustomize(K8S_DEV)]:
        if doc["kind"] == "Service":
            ports = {p.get("port") for p in doc["spec"]["ports"]}
            assert 8222 not in ports, doc["metadata"]["name"]
    [values] = yaml_docs(K8S / "nats-values.yaml")
    assert values["service"]["ports"]["monitor"] == {"enabled": False}
    # The chart's headless Service lists every enabled port: monitoring is removed.
    assert values["headlessService"]["patch"] == [
        {"op": "test", "path": "/spec/ports/2/name", "value": "monitor"},
        {"op": "remove", "path": "/spec/ports/2"},
    ]
    assert values["natsBox"]["enabled"] is False
    # Docker Compose publishes no monitoring port; every static config keeps it on loopback.
    for name, service in compose()["services"].items():
        assert not any("8222" in str(p) for p in service.get("ports", [])), name
    configs = [
        *(DEPLOY / "nats").glob("n*.conf"),
        *LEAFNODES.glob("*.conf"),
        COMPOSE / "nats.conf",
        SYSTEMD / "nats-server.conf",
    ]
    for path in configs:
        [http] = re.findall(
            r"^(?:http|http_port|monitor_port)\s*[:=]\s*(\S+)", path.read_text(), re.M
        )
        assert http.startswith("127.0.0.1:"), path


def test_setup_jobs_push_and_apply_with_valid_commands() -> None:
    jobs = [d for _, d in k8s_objects() if d["kind"] == "Job"]
    assert {j["metadata"]["name"] for j in jobs} == {"deadlift-setup-acme", "deadlift-setup-stripe"}
    for job in jobs:
        [container] = job["spec"]["template"]["spec"]["containers"]
        assert container["command"][:2] == ["sh", "-ec"]
        commands = [check_invocation(line) for line in shell_lines(container["command"][2])]
        assert commands[-1] == ["workflow", "apply"]


def test_disruption_budgets_cover_each_worker_deployment() -> None:
    budgets = [d for _, d in k8s_objects() if d["kind"] == "PodDisruptionBudget"]
    for name, deployment in deployments().items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        matching = [
            b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(matching) == 1, name
        assert matching[0]["spec"]["maxUnavailable"] == 1


def expected_consumers(org: str) -> set[tuple[str, str]]:
    """Every (stream, consumer) a worker of ``org`` pulls from, per config/workflows."""
    wanted = set()
    for path in WORKFLOWS.values():
        workflow = parse_workflow(path.read_text())
        if workflow.org != org:
            continue
        for step in workflow.steps:
            name = consumer_name(workflow.org, workflow.name, step.name)
            wanted.add(("DEADLIFT_STEPS", name))
            if step in workflow.entry_steps():
                wanted.add(("DEADLIFT_EVENTS", f"{name}--trigger"))
    return wanted


def test_keda_scales_each_org_on_the_lag_of_every_consumer_of_its_steps() -> None:
    scaled = [d for _, d in k8s_objects() if d["kind"] == "ScaledObject"]
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled} == set(deployments())
    for obj in scaled:
        org = obj["metadata"]["labels"]["deadlift.dev/org"]
        assert obj["spec"]["minReplicaCount"] >= 1
        assert obj["spec"]["maxReplicaCount"] > obj["spec"]["minReplicaCount"]
        found = set()
        for trigger in obj["spec"]["triggers"]:
            assert trigger["type"] == "nats-jetstream"
            meta = trigger["metadata"]
            assert meta["account"] == account_name(org)
            assert meta["natsServerMonitoringEndpoint"].startswith("nats-headless.")
            assert meta["natsServerMonitoringEndpoint"].endswith(":8222")
            assert int(meta["lagThreshold"]) > 0
            found.add((meta["stream"], meta["consumer"]))
        assert found == expected_consumers(org), org


def test_the_config_map_is_the_production_manifest_and_the_workflows_of_config() -> None:
    [config] = [d for _, d in k8s_objects() if d["kind"] == "ConfigMap"]
    data = config["data"]
    for name, path in WORKFLOWS.items():
        assert data[name] == path.read_text(), name
    # Every org's pods mount it: the orgs and what crosses between them, as in
    # config/orgs.yaml, but no password and no secret value.
    production = OrgManifest.model_validate(yaml.safe_load(data["orgs.yaml"]))
    assert list(production.orgs) == list(ORGS.orgs)
    for name, org in production.orgs.items():
        dev = ORGS.org(name)
        for field in ("subjects", "exports", "imports", "config", "limits"):
            assert getattr(org, field) == getattr(dev, field), (name, field)
        assert set(org.secrets) == set(dev.secrets), name
        for secret in org.secrets.values():
            assert secret.value is None and (secret.env or secret.file), name
        assert all(u.nkey and not u.password for u in org.users), name
    assert production.integrations == ORGS.integrations
    assert production.system is None or not production.system.password


def test_the_routes_need_the_clusters_certificate_and_the_route_identity() -> None:
    """Route and leaf listeners everywhere: mutual TLS and an authorization block."""
    [values] = yaml_docs(K8S / "nats-values.yaml")
    cluster = values["config"]["cluster"]
    assert cluster["enabled"] and cluster["tls"]["enabled"]
    assert cluster["tls"]["merge"]["verify_and_map"] is True
    assert cluster["merge"]["authorization"]["user"] == ROUTE_IDENTITY
    assert "routeURLs" not in cluster  # no route password in a ConfigMap
    # The certificate behind it: cert-manager's, with that identity, of a CA of its own.
    certificates = {
        d["metadata"]["name"]: d["spec"] for _, d in k8s_objects() if d["kind"] == "Certificate"
    }
    route = certificates["nats-route"]
    assert route["secretName"] == cluster["tls"]["secretName"]
    assert f"CN={route['commonName']}" == ROUTE_IDENTITY
    assert {"server auth", "client auth"} <= set(route["usages"])
    assert route["issuerRef"]["name"] == "deadlift-nats-ca"
    assert certificates["deadlift-nats-ca"]["isCA"] is True
    # The static configs: a tls block requiring peers' certificates, and authorization.
    for path in [
        *(DEPLOY / "nats").glob("n*.conf"),
        COMPOSE / "nats.conf",
        SYSTEMD / "nats-server.conf",
    ]:
        routes = conf_block(path.read_text(), "cluster")
        assert re.search(r"\bverify_and_map:\s*true", conf_block(routes, "tls")), path
        assert f'user: "{ROUTE_IDENTITY}"' in conf_block(routes, "authorization"), path
    hub = conf_block((LEAFNODES / "hub.conf").read_text(), "leafnodes")
    assert re.search(r"\bverify_and_map:\s*true", conf_block(hub, "tls"))
    assert "users" in conf_block(hub, "authorization") and "password" not in hub
    for org in ("acme", "stripe"):
        leaf = conf_block((LEAFNODES / f"{org}.conf").read_text(), "leafnodes")
        assert "cert_file" in conf_block(leaf, "tls") and "@" not in leaf, org


def conf_block(text: str, name: str) -> str:
    """The body of the first ``name { … }`` block of a nats-server config (comments dropped)."""
    text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    match = re.search(rf"(?m)^\s*{name}\s*[:=]?\s*{{", text)
    assert match, f"no {name} block"
    depth, start = 1, match.end()
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    raise AssertionError(f"unclosed {name} block")


def test_nats_helm_values_make_a_three_node_jetstream_cluster_with_the_accounts_secret() -> None:
    [values] = yaml_docs(K8S / "nats-values.yaml")
    config = values["config"]
    assert config["cluster"]["replicas"] == 3
    assert config["jetstream"]["enabled"] and config["jetstream"]["fileStore"]["enabled"]
    assert config["jetstream"]["fileStore"]["pvc"]["size"]
    assert config["monitor"]["enabled"] and config["monitor"]["port"] == 8222
    assert values["podDisruptionBudget"]["enabled"] is True
    # The accounts come from a Secret of yours, never from these values.
    assert config["merge"]["$include"] == "../deadlift-accounts/accounts.conf"
    [mount] = [p["value"] for p in values["container"]["patch"] if p["path"] == "/volumeMounts/-"]
    assert mount["mountPath"] == "/etc/deadlift-accounts" and mount["readOnly"] is True
    [volume] = [
        p["value"] for p in values["podTemplate"]["patch"] if p["path"] == "/spec/volumes/-"
    ]
    assert volume["name"] == mount["name"]
    assert volume["secret"]["secretName"] == "deadlift-nats-accounts"
    assert "password" not in (K8S / "nats-values.yaml").read_text().lower()


def test_the_static_accounts_file_is_current_with_the_org_manifest() -> None:
    assert (DEPLOY / "nats" / "accounts.conf").read_text() == render_nats_config(ORGS)


# -- systemd --------------------------------------------------------------------------


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((SYSTEMD / name).read_text())
    return parser


def test_systemd_worker_unit_runs_deadlift_per_org() -> None:
    worker = unit("deadlift-worker@.service")
    assert set(worker.sections()) == {"Unit", "Service", "Install"}
    service = worker["Service"]
    for key in ("ExecStart", "ExecStartPre"):
        argv = shlex.split(service[key].replace("%i", "acme"))
        assert argv[0].startswith("/") and argv[0].endswith("/deadlift"), key
        assert argv[1:3] == ["--org", "acme"]
    assert check_invocation(shlex.split(service["ExecStart"].replace("%i", "acme"))) == ["worker"]
    assert check_invocation(shlex.split(service["ExecStartPre"].replace("%i", "acme"))) == [
        "health"
    ]
    assert service["KillSignal"] == "SIGTERM" and int(service["TimeoutStopSec"]) > 20
    assert worker["Install"]["WantedBy"] == "multi-user.target"
    # Each org's worker runs as a user of its own and gets its own env file only
    # (required: no credentials, no start).
    assert service["DynamicUser"] == "yes" and "%i" in service["User"]
    env_files = (SYSTEMD / "deadlift-worker@.service").read_text()
    assert "EnvironmentFile=/etc/deadlift/%i.env\n" in env_files
    assert "%i" in service["CacheDirectory"]
    settings_env = {f"DEADLIFT_{f.upper()}" for f in Settings.model_fields} | CLI_ENV
    for env_file in ("deadlift.env", "stripe.env.example"):
        for line in (SYSTEMD / env_file).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                assert line.split("=", 1)[0] in settings_env, (env_file, line)


def test_systemd_nats_unit_runs_nats_server_with_lame_duck_stop() -> None:
    service = unit("nats-server.service")["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/nats-server") and argv[-1] == "/etc/nats/nats-server.conf"
    assert service["KillSignal"] == "SIGUSR2"
    assert service["WorkingDirectory"] == "/etc/nats"  # the config's relative tls/ paths


# -- nats-server configs: parsed by nats-server itself, and run ------------------------


def nats_check(config: Path, cwd: Path | None = None, **env: str) -> None:
    result = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **env},
        cwd=cwd,
    )
    assert result.returncode == 0, f"{config}: {result.stderr or result.stdout}"


# The passwords the static org servers read from their environment (never shipped).
LEAF_ENV = {"ACME_PASSWORD": "acme-test-password", "STRIPE_PASSWORD": "stripe-test-password"}


def documented_certs(path: Path) -> list[list[str]]:
    """The `deadlift certs …` commands a config's comments tell the operator to run."""
    lines = [ln.strip().lstrip("#").split("#")[0] for ln in path.read_text().splitlines()]
    return [shlex.split(ln) for ln in lines if ln.strip().startswith("deadlift certs ")]


def make_certificates(where: Path) -> CertificateAuthority:
    """Run, in ``where``, the certificate commands deploy/nats and deploy/leafnodes
    document (one CA here for all of them), with the real CLI."""
    commands = [
        *documented_certs(DEPLOY / "nats" / "n1.conf"),
        *documented_certs(LEAFNODES / "hub.conf"),
    ]
    assert len(commands) == 3, commands
    with contextlib.chdir(where):
        for argv in commands:
            result = CliRunner().invoke(main, argv[1:])
            assert result.exit_code == 0, (argv, result.output)
    authority = CertificateAuthority(where / "tls")
    # systemd: one host's pair, under the names its config reads.
    authority.issue("route", hosts=["127.0.0.1"], common_name=ROUTE_IDENTITY.removeprefix("CN="))
    return authority


def test_every_nats_config_is_accepted_by_nats_server(tmp_path: Path) -> None:
    authority = make_certificates(tmp_path)
    static = [*(DEPLOY / "nats").glob("*.conf"), *LEAFNODES.glob("*.conf")]
    for path in static:
        shutil.copy(path, tmp_path / path.name)
    for path in static:
        nats_check(tmp_path / path.name, cwd=tmp_path, **LEAF_ENV)
    # Without the certificates, or an org server without its password: no start.
    broken = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(tmp_path / "acme.conf")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=30,
    )
    assert broken.returncode != 0 and "ACME_PASSWORD" in broken.stderr
    # Containers and hosts get accounts.conf next to their config, and their certificates.
    where = tmp_path / "compose"
    where.mkdir()
    shutil.copy(COMPOSE / "nats.conf", where / "nats.conf")
    shutil.copy(DEPLOY / "nats" / "accounts.conf", where / "accounts.conf")
    tls = authority.directory
    route_files = {"ROUTE_CERT": str(tls / "n1.pem"), "ROUTE_KEY": str(tls / "n1-key.pem")}
    nats_check(
        where / "nats.conf", SERVER_NAME="nats-1", ROUTE_CA=str(authority.cert), **route_files
    )
    shutil.copy(SYSTEMD / "nats-server.conf", tmp_path / "nats-server.conf")
    nats_check(tmp_path / "nats-server.conf", cwd=tmp_path, NATS_SERVER_NAME="nats-1")
    # The configs deadlift.cluster renders.
    cluster = LocalCluster(3, store_dir=tmp_path / "cluster", orgs=ORGS)
    topology = LeafTopology(ORGS, ["acme", "stripe"], store_dir=tmp_path / "leaf")
    for node in [*cluster.nodes, *topology.processes]:
        nats_check(node.write_config())


def relocate(files: list[Path], into: Path) -> list[Path]:
    """Copy nats-server configs to ``into`` with every 127.0.0.1 port moved to a free one."""
    ports: dict[str, str] = {}
    copies = []
    for path in files:
        text = path.read_text()
        for port in re.findall(r"127\.0\.0\.1:(\d+)", text):
            ports.setdefault(port, str(free_port()))
        text = re.sub(r"127\.0\.0\.1:(\d+)", lambda m: f"127.0.0.1:{ports[m.group(1)]}", text)
        copy = into / path.name
        copy.write_text(text)
        copies.append(copy)
    return copies


@contextlib.contextmanager
def running(configs: list[Path], cwd: Path, **env: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    processes = [
        subprocess.Popen(
            [nats_server_binary(), "-c", str(c)],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **env},
        )
        for c in configs
    ]
    try:
        yield processes
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def monitor(config: Path, endpoint: str) -> dict[str, Any]:
    port = re.search(r"^http: 127\.0\.0\.1:(\d+)", config.read_text(), re.M).group(1)  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}/{endpoint}"
    with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(url, timeout=1) as r:
        return dict(json.loads(r.read()))
    return {}


def client_url(config: Path) -> str:
    port = re.search(r"^listen: 127\.0\.0\.1:(\d+)", config.read_text(), re.M).group(1)  # type: ignore[union-attr]
    return f"nats://127.0.0.1:{port}"


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout} s")


@pytest.mark.slow
def test_the_static_cluster_configs_form_a_jetstream_cluster_closed_to_strangers(
    tmp_path: Path,
) -> None:
    authority = make_certificates(tmp_path)  # as deploy/nats/n1.conf says
    sources = sorted((DEPLOY / "nats").glob("n*.conf"))
    configs = relocate(sources, tmp_path)
    shutil.copy(DEPLOY / "nats" / "accounts.conf", tmp_path / "accounts.conf")
    with running(configs, tmp_path):

        def agreed() -> bool:
            if not all(monitor(c, "healthz").get("status") == "ok" for c in configs):
                return False
            leaders = {(monitor(c, "jsz").get("meta_cluster") or {}).get("leader") for c in configs}
            return len(leaders) == 1 and None not in leaders and "" not in leaders

        wait_for(agreed, 30, "a meta leader all nodes agree on")
        cluster = monitor(configs[0], "varz")["cluster"]
        assert cluster["tls_required"] and cluster["tls_verify"]

        async def r3_stream() -> int:
            nc = await nats.connect(
                servers=[client_url(c) for c in configs], user="acme", password="acme-dev"
            )
            try:
                js = nc.jetstream()
                info = await js.add_stream(name="R3", subjects=["acme.r3"], num_replicas=3)
                return info.config.num_replicas or 1
            finally:
                await nc.close()

        assert asyncio.run(r3_stream()) == 3

        # A stranger holding a certificate of the same CA, but not the route identity
        # (the hub's), dials every node's cluster port: the TLS handshake succeeds,
        # verify_and_map refuses it.
        route_ports = [
            re.search(r"^\s+listen: 127\.0\.0\.1:(\d+)", c.read_text(), re.M).group(1)  # type: ignore[union-attr]
            for c in configs
        ]
        log = tmp_path / "stranger.log"
        stranger = tmp_path / "stranger.conf"
        stranger.write_text(
            json.dumps(
                {
                    "server_name": "stranger",
                    "listen": f"127.0.0.1:{free_port()}",
                    "http": f"127.0.0.1:{free_port()}",
                    "log_file": str(log),
                    "cluster": {
                        "name": "deadlift",
                        "listen": f"127.0.0.1:{free_port()}",
                        "routes": [f"nats-route://127.0.0.1:{p}" for p in route_ports],
                        "tls": {
                            "cert_file": str(authority.directory / "hub.pem"),
                            "key_file": str(authority.directory / "hub-key.pem"),
                            "ca_file": str(authority.cert),
                        },
                    },
                }
            )
        )
        with running([stranger], tmp_path):

            def refused_everywhere() -> bool:
                text = log.read_text() if log.exists() else ""
                refusals = [ln for ln in text.splitlines() if "Authorization Violation" in ln]
                return all(any(f":{p} " in ln for ln in refusals) for p in route_ports)

            wait_for(refused_everywhere, 15, "every node refused the stranger")
            for config in configs:
                names = {r.get("remote_name") for r in monitor(config, "routez").get("routes", [])}
                assert names == {"n1", "n2", "n3"} - {config.stem}, names
    assert all((tmp_path / "data" / f"n{i}").is_dir() for i in (1, 2, 3))


@pytest.mark.slow
def test_the_static_leaf_node_configs_carry_an_event_from_stripe_to_acme(
    tmp_path: Path,
) -> None:
    make_certificates(tmp_path)  # as deploy/leafnodes/hub.conf says
    hub, acme, stripe = relocate(
        [DEPLOY / "leafnodes" / f"{n}.conf" for n in ("hub", "acme", "stripe")], tmp_path
    )
    with running([hub, acme, stripe], tmp_path, **LEAF_ENV):
        wait_for(lambda: monitor(hub, "leafz").get("leafnodes") == 2, 30, "two leaf nodes")
        leafz = monitor(hub, "leafz")
        # Each org's server landed in its own account, by the certificate it presented.
        assert {(x["name"], x["account"]) for x in leafz["leafs"]} == {
            ("acme", "ACME"),
            ("stripe", "STRIPE"),
        }
        leafnode = monitor(hub, "varz")["leaf"]
        assert leafnode["tls_required"] and leafnode["tls_verify"]

        async def cross() -> tuple[str, bytes]:
            receiver = await nats.connect(
                client_url(acme), user="acme", password=LEAF_ENV["ACME_PASSWORD"]
            )
            sender = await nats.connect(
                client_url(stripe), user="stripe", password=LEAF_ENV["STRIPE_PASSWORD"]
            )
            try:
                sub = await receiver.subscribe("acme.in.stripe.>")
                await receiver.flush()
                for _ in range(100):  # interest crosses the hub asynchronously
                    await sender.publish("stripe.out.acme.discounts", b"10% off")
                    with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                        msg = await sub.next_msg(timeout=0.1)
                        return msg.subject, msg.data
                raise AssertionError("nothing crossed the hub")
            finally:
                await receiver.close()
                await sender.close()

        assert asyncio.run(cross()) == ("acme.in.stripe.discounts", b"10% off")
