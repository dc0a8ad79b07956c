"""deploy/ validated offline: files parse, commands are valid ``deadlift`` invocations,
Kubernetes objects are well-formed (schema-checked when kubernetes-validate is
installed), generated copies match config/, and the static nats-server configs
really run: the loopback cluster elects a leader and the leaf nodes carry an event.
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

from deadlift.cli import main
from deadlift.cluster import LeafTopology, LocalCluster
from deadlift.orgs import account_name, load_orgs, render_nats_config
from deadlift.server import free_port, nats_server_binary
from deadlift.settings import Settings
from deadlift.wasm.hostfns import load_pack
from deadlift.workflow import consumer_name, parse_workflow
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose"
SYSTEMD = DEPLOY / "systemd"
ORGS = load_orgs(ROOT / "config" / "orgs.yaml")
WORKFLOWS = {p.name: p for p in sorted((ROOT / "config" / "workflows").glob("*.yaml"))}
# Environment variables the CLI reads besides the Settings fields (DEADLIFT_<FIELD>).
CLI_ENV = {"DEADLIFT_LOG_FORMAT", "DEADLIFT_HOST_FUNCTIONS", "DEADLIFT_ORGS_FILE"}


def yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, doc)
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "nats-values.yaml"  # Helm values, not an object
        for doc in yaml_docs(path)
    ]


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
    for name in ("nats-1", "nats-2", "nats-3"):
        nats_service = services[name]
        assert nats_service["image"].startswith("nats:")
        assert nats_service["environment"]["SERVER_NAME"] == name
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
        "Secret",
        "Job",
        "Deployment",
        "PodDisruptionBudget",
        "ScaledObject",
        "Kustomization",
    }
    for path, doc in objects:
        assert doc.get("apiVersion") and doc.get("kind"), path
        if doc["kind"] != "Kustomization":
            assert re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", doc["metadata"]["name"]), path
    [kustomization] = [doc for _, doc in objects if doc["kind"] == "Kustomization"]
    listed = set(kustomization["resources"])
    assert listed == {p.name for p, d in objects if d["kind"] != "Kustomization"}


def test_kubernetes_objects_pass_the_official_schemas() -> None:
    import kubernetes_validate as validator  # a dev dependency: make test installs it

    for path, doc in k8s_objects():
        if doc["apiVersion"].startswith(("keda.sh/", "kustomize.config.k8s.io/")):
            continue  # CRDs and kustomize: checked structurally below
        try:
            validator.validate(doc, "1.31.0", strict=True)
        except validator.ValidationError as exc:
            raise AssertionError(f"{path.name}: {doc['kind']} {exc}") from None


def deployments() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in k8s_objects() if d["kind"] == "Deployment"}


def test_worker_deployments_run_deadlift_with_exec_probes() -> None:
    secrets = {d["metadata"]["name"] for _, d in k8s_objects() if d["kind"] == "Secret"}
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
        assert [e["secretRef"]["name"] for e in container["envFrom"]] == [f"deadlift-nats-{org}"]
        assert f"deadlift-nats-{org}" in secrets
        grace = spec["terminationGracePeriodSeconds"]
        assert grace > float(env["DEADLIFT_SHUTDOWN_TIMEOUT_S"])
        labels = deployment["spec"]["selector"]["matchLabels"]
        assert deployment["spec"]["template"]["metadata"]["labels"] == labels


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


def test_the_config_map_is_a_copy_of_config() -> None:
    [config] = [d for _, d in k8s_objects() if d["kind"] == "ConfigMap"]
    data = config["data"]
    assert data["orgs.yaml"] == (ROOT / "config" / "orgs.yaml").read_text()
    for name, path in WORKFLOWS.items():
        assert data[name] == path.read_text(), name


def test_nats_helm_values_make_a_three_node_jetstream_cluster_with_the_org_accounts() -> None:
    [values] = yaml_docs(K8S / "nats-values.yaml")
    config = values["config"]
    assert config["cluster"] == {"enabled": True, "replicas": 3}
    assert config["jetstream"]["enabled"] and config["jetstream"]["fileStore"]["enabled"]
    assert config["jetstream"]["fileStore"]["pvc"]["size"]
    assert config["monitor"]["enabled"] and config["monitor"]["port"] == 8222
    assert values["podDisruptionBudget"]["enabled"] is True
    included = config["merge"]["$include"]
    accounts = values["configMap"]["merge"]["data"][included]
    assert accounts == render_nats_config(ORGS)


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


# -- nats-server configs: parsed by nats-server itself, and run ------------------------


def nats_check(config: Path, **env: str) -> None:
    result = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, f"{config}: {result.stderr or result.stdout}"


def test_every_nats_config_is_accepted_by_nats_server(tmp_path: Path) -> None:
    for path in [*(DEPLOY / "nats").glob("*.conf"), *(DEPLOY / "leafnodes").glob("*.conf")]:
        nats_check(path)
    # Containers and hosts get accounts.conf next to their config.
    for source, env in (
        (COMPOSE / "nats.conf", {"SERVER_NAME": "nats-1"}),
        (SYSTEMD / "nats-server.conf", {"NATS_SERVER_NAME": "nats-1"}),
    ):
        where = tmp_path / source.parent.name
        where.mkdir()
        shutil.copy(source, where / source.name)
        shutil.copy(DEPLOY / "nats" / "accounts.conf", where / "accounts.conf")
        nats_check(where / source.name, **env)
    # The configs deadlift.cluster renders.
    cluster = LocalCluster(3, store_dir=tmp_path / "cluster", orgs=ORGS)
    topology = LeafTopology(ORGS, ["acme", "stripe"], store_dir=tmp_path / "leaf")
    for node in [*cluster.nodes, *topology.processes]:
        node.workdir.mkdir(parents=True, exist_ok=True)
        node.config_file.write_text(json.dumps(node.config))
        nats_check(node.config_file)


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
def running(configs: list[Path], cwd: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    processes = [
        subprocess.Popen(
            [nats_server_binary(), "-c", str(c)],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
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
def test_the_static_cluster_configs_form_a_jetstream_cluster(tmp_path: Path) -> None:
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
    assert all((tmp_path / "data" / f"n{i}").is_dir() for i in (1, 2, 3))


@pytest.mark.slow
def test_the_static_leaf_node_configs_carry_an_event_from_stripe_to_acme(
    tmp_path: Path,
) -> None:
    hub, acme, stripe = relocate(
        [DEPLOY / "leafnodes" / f"{n}.conf" for n in ("hub", "acme", "stripe")], tmp_path
    )
    with running([hub, acme, stripe], tmp_path):
        wait_for(lambda: monitor(hub, "leafz").get("leafnodes") == 2, 30, "two leaf nodes")

        async def cross() -> tuple[str, bytes]:
            receiver = await nats.connect(client_url(acme), user="acme", password="acme-dev")
            sender = await nats.connect(client_url(stripe), user="stripe", password="stripe-dev")
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
