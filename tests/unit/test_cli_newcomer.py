"""A newcomer's first hour (issue 14), without a server: version, manifest lookup,
percent-encoded CloudEvents headers, bench progress, the dev banner's command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from deadlift.bus.registry import ModuleMeta
from deadlift.cli import dev as dev_cli
from deadlift.cli.app import main
from deadlift.cli.workflows import pinned
from deadlift.demo import cli_command
from deadlift.model.workflow import parse_workflow
from deadlift.ops import benchmark
from deadlift.settings import ORGS_FILE, Settings, find_orgs_file
from deadlift.wire import events

SHA_A = "a" * 64
SHA_B = "b" * 64

# -- --version ----------------------------------------------------------------------


def test_version_flag_prints_the_installed_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("deadlift ")
    assert result.output.split()[1][0].isdigit()


# -- the org manifest is found from any directory of the project --------------------------


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "config").mkdir()
    (tmp_path / ORGS_FILE).write_text(
        "orgs:\n  acme:\n    users: [{user: acme, password: acme-dev}]\n", encoding="utf-8"
    )
    (tmp_path / "src" / "deep").mkdir(parents=True)
    return tmp_path


def test_manifest_is_found_walking_up_from_a_subdirectory(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DEADLIFT_ORGS_FILE", raising=False)
    assert find_orgs_file(project / "src" / "deep") == (project / ORGS_FILE).resolve()
    monkeypatch.chdir(project / "src" / "deep")
    assert Path(Settings().orgs_file) == (project / ORGS_FILE).resolve()


def test_an_explicit_manifest_wins(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project / "src")
    monkeypatch.setenv("DEADLIFT_ORGS_FILE", "elsewhere.yaml")
    assert Settings().orgs_file == "elsewhere.yaml"


def test_org_without_a_manifest_names_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DEADLIFT_ORGS_FILE", raising=False)
    result = CliRunner().invoke(main, ["--org", "acme", "publish", "calc.in", "{}"])
    assert result.exit_code == 2
    assert f"looked for {ORGS_FILE} in {tmp_path}" in result.output
    assert "--orgs FILE" in result.output


def test_explicit_missing_manifest_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["--orgs", "nope.yaml", "nats-config"])
    assert result.exit_code == 2
    assert "org manifest nope.yaml not found" in result.output


# -- CloudEvents header values are percent-encoded where the binding says ----------------


@pytest.mark.parametrize("text", ["zoë", "日本", "100% sure", "a%20b", "zoë 50%"])
def test_non_ascii_and_percent_header_values_round_trip(text: str) -> None:
    event = events.new_event(
        {"v": 1}, source=f"deadlift://{text}", type=text, extensions={"note": text}
    )
    headers, body = events.encode(event)
    assert all(value.isascii() for value in headers.values())
    back = events.decode(headers, body, fallback_id="-", fallback_source="-")
    assert (back.type, back.source, back.extensions["note"]) == (
        text,
        f"deadlift://{text}",
        text,
    )


def test_non_ascii_is_sent_as_utf8_percent_escapes() -> None:
    headers, _ = events.encode(events.new_event(1, source="s", type="zoë.日本"))
    assert headers["ce-type"] == "zo%C3%AB.%E6%97%A5%E6%9C%AC"


def test_ascii_header_values_are_byte_identical() -> None:
    event = events.new_event(
        1,
        source="deadlift://acme/calc/add",
        type="deadlift.acme.calc.add",
        id="ch_001",
        extensions={events.RUN: "run-1"},
    )
    headers, _ = events.encode(event)
    assert headers["ce-type"] == "deadlift.acme.calc.add"
    assert headers["ce-source"] == "deadlift://acme/calc/add"
    assert headers["ce-id"] == "ch_001"
    assert headers["ce-deadliftrun"] == "run-1"


def test_a_foreign_literal_percent_is_kept() -> None:
    headers = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "s", "ce-type": "50%off%zz"}
    decoded = events.decode(headers, b"", fallback_id="-", fallback_source="-")
    assert decoded.type == "50%off%zz"


def test_output_encoder_encodes_a_non_ascii_run() -> None:
    encoder = events.OutputEncoder.for_step("acme", "calc", "add")
    headers, body = encoder.encode(
        1, id="x", time=events.now_rfc3339(), run="zoë", traceparent=None
    )
    assert headers["ce-deadliftrun"] == "zo%C3%AB"
    assert events.decode(headers, body, fallback_id="-", fallback_source="-").run == "zoë"


# -- workflow apply names what it pinned ---------------------------------------------------


def _meta(name: str, version: str, sha: str) -> ModuleMeta:
    return ModuleMeta(name=name, version=version, sha256=sha, size=1, exports=["f"])


def test_apply_report_names_each_steps_module_version_and_sha256() -> None:
    flow = parse_workflow(
        "name: calc\norg: acme\ntrigger: calc.in\nsteps:\n"
        "  - {name: add, module: add_ten, function: f, next: [mul]}\n"
        "  - {name: mul, module: mul@1, function: f}\n"
    )
    steps = [
        flow.steps[0].model_copy(update={"module_sha256": SHA_B, "codec": "json"}),
        flow.steps[1].model_copy(update={"module_sha256": SHA_A, "codec": "json"}),
    ]
    applied = flow.model_copy(update={"steps": steps})
    metas = [_meta("add_ten", "1", SHA_A), _meta("add_ten", "2", SHA_B), _meta("mul", "1", SHA_A)]
    [report] = pinned([applied], metas)
    assert report["key"] == "acme.calc"
    assert [(s["name"], s["module_ref"], s["sha256"]) for s in report["steps"]] == [
        ("add", "add_ten@2", SHA_B),
        ("mul", "mul@1", SHA_A),
    ]


# -- bench shows its progress ----------------------------------------------------------


async def test_benchmark_run_reports_each_run_start_and_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def fake(*args: Any, **kwargs: Any) -> benchmark.Result:
        return benchmark.Result("x", 10, 1.0, p50_ms=1.0, p99_ms=2.0, extra={"rss_mb": 1.0})

    for name in (
        "bare_loop",
        "deadlift_throughput",
        "deadlift_latency",
        "worker_rss",
        "guest_throughput",
    ):
        monkeypatch.setattr(benchmark, name, fake)
    seen: list[tuple[int, str, bool]] = []
    report = await benchmark.run(
        100, pairs=3, progress=lambda n, of, label, r: seen.append((n, label, r is None))
    )
    total = benchmark.runs(3)
    assert len(seen) == 2 * total
    assert [started for _, _, started in seen] == [True, False] * total
    labels = [label for _, label, started in seen if started]
    assert labels[:3] == [
        "bare loop (round 1/3)",
        "deadlift worker (round 1/3)",
        "bare loop (round 2/3)",
    ]
    assert seen[-1][0] == total
    pairs = report["comparisons"]["deadlift worker / bare loop"]
    assert pairs["pairs"] == 3 and pairs["median_ratio"] == pairs["spread"][0] == 1.0
    assert set(report["targets"]) == set(report["measured"])


def _fake_bench(monkeypatch: pytest.MonkeyPatch, report: dict[str, Any] | None = None) -> None:
    async def fake_run(*, events_count: int, pairs: int, progress: Any = None) -> dict[str, Any]:
        result = benchmark.Result("bare loop", events_count, 2.0)
        if progress:
            progress(1, 1, "bare loop", None)
            progress(1, 1, "bare loop", result)
        return report or {"results": [], "ratios": {}, "targets": {}}

    monkeypatch.setattr(dev_cli, "run_benchmark", fake_run)


def test_bench_prints_progress_on_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_bench(monkeypatch)
    result = CliRunner().invoke(main, ["bench", "-n", "100"])
    assert result.exit_code == 0, result.output
    assert "[1/1] bare loop …" in result.stderr
    assert "[1/1] bare loop: 50 events/s in 2.0 s" in result.stderr


def test_bench_json_has_no_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_bench(monkeypatch)
    result = CliRunner().invoke(main, ["bench", "--json", "-n", "100"])
    assert result.exit_code == 0
    assert result.stderr == ""


def test_bench_prints_median_ratio_spread_and_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    pairs = {
        "pairs": 3,
        "ratios": [2.1, 2.31, 2.45],
        "median_ratio": 2.31,
        "spread": [2.1, 2.45],
    }
    bare = {"name": "bare loop", "events": 100, "seconds": 1.0, "rate": 100.0}
    _fake_bench(
        monkeypatch,
        {
            "pairs": 3,
            "results": [{**bare, "p50_ms": None, "p99_ms": None, "extra": {}, "runs": [90, 100]}],
            "comparisons": {"deadlift worker / bare loop": pairs},
            "ratios": {"deadlift worker / bare loop": 2.31},
            "targets": {"deadlift worker (default) >= 2.0x bare loop": True, "RSS": False},
            "measured": {"deadlift worker (default) >= 2.0x bare loop": "2.31x [2.10-2.45]"},
        },
    )
    result = CliRunner().invoke(main, ["bench", "--pairs", "3"])
    assert result.exit_code == 0, result.output
    assert "deadlift worker / bare loop: 2.31x [2.10-2.45]" in result.stdout
    assert "✓ met deadlift worker (default) >= 2.0x bare loop: 2.31x [2.10-2.45]" in result.stdout
    assert "✗ not met RSS" in result.stdout


def test_bench_refuses_zero_pairs() -> None:
    result = CliRunner().invoke(main, ["bench", "--pairs", "0"])
    assert result.exit_code == 2


# -- the dev banner names a command that runs -------------------------------------------


def test_dev_banner_command_runs_from_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # deadlift is not on the PATH
    command = cli_command()
    assert command != "deadlift"
    assert Path(command).is_file() or command.endswith("-m deadlift.cli")
