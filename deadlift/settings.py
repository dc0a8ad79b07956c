"""Settings in one place: environment variables prefixed ``DEADLIFT_``, validated once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ORGS_FILE = "config/orgs.yaml"
"""Where the org manifest lies in a project, relative to the project root."""


def find_orgs_file(start: str | Path | None = None) -> Path | None:
    """The org manifest of the project around ``start`` (default: the current directory).

    Walks up from ``start`` to the first directory holding ``config/orgs.yaml``
    (the project root), as git finds ``.git``; None when no directory has one.
    """
    try:
        here = Path(start if start is not None else Path.cwd()).resolve()
    except OSError:  # the current directory was removed
        return None
    for directory in (here, *here.parents):
        candidate = directory / ORGS_FILE
        if candidate.is_file():
            return candidate
    return None


def default_orgs_file() -> str:
    """The nearest project's org manifest (:func:`find_orgs_file`), else ``config/orgs.yaml``."""
    found = find_orgs_file()
    return str(found) if found is not None else ORGS_FILE


def missing_orgs_file(path: str | Path) -> str | None:
    """Why the org manifest ``path`` cannot be used (a message naming where it was
    looked for and what to do), or None when the file exists."""
    if Path(path).is_file():
        return None
    if str(path) == ORGS_FILE:
        try:
            where = str(Path.cwd())
        except OSError:
            where = "the current directory"
        return (
            f"no org manifest: looked for {ORGS_FILE} in {where} and every directory above "
            "it; run from the project or pass --orgs FILE (DEADLIFT_ORGS_FILE)"
        )
    return (
        f"org manifest {path} not found (from --orgs / DEADLIFT_ORGS_FILE, relative to "
        f"{Path.cwd()}); point it at the project's {ORGS_FILE}"
    )


class Settings(BaseSettings):
    """Runtime settings; every field can be set as ``DEADLIFT_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="DEADLIFT_", extra="ignore", frozen=True)

    nats_url: str = Field(
        "nats://127.0.0.1:4222", description="NATS server URL(s), comma-separated"
    )
    creds: str | None = Field(None, description="NATS credentials file (.creds)")
    user: str | None = Field(None, description="NATS user name")
    password: str | None = Field(None, description="NATS password")
    token: str | None = Field(None, description="NATS token")
    org: str | None = Field(None, description="act as this org (credentials from the manifest)")
    system_creds: str | None = Field(
        None, description="operator commands: the system account's credentials file"
    )
    system_user: str | None = Field(None, description="operator commands: system account user")
    system_password: str | None = Field(
        None, description="operator commands: system account password", repr=False
    )
    orgs_file: str = Field(
        default_factory=default_orgs_file,
        description="the org manifest (default: config/orgs.yaml in the nearest directory "
        "above the current one that has it)",
    )

    default_timeout_ms: int = Field(1000, gt=0, description="per-call module timeout")
    default_max_pages: int = Field(256, gt=0, description="module memory limit, 64 KiB pages")
    max_output_bytes: int = Field(512 * 1024, gt=0, description="largest module output accepted")
    module_log_bytes: int = Field(
        16 * 1024,
        ge=0,
        description="module log text passed on per call; the rest is dropped and counted",
    )
    fast_lane: bool = Field(
        True,
        description="run a quick module's lone events on the event loop's thread (no "
        "thread hop; a call there is cut off after 2 ms and run again in a thread)",
    )
    concurrency: int = Field(256, gt=0, description="events in flight per step per worker")
    threads: int = Field(
        0, ge=0, description="threads running modules per worker (0: one per core, 2 to 8)"
    )
    processes: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="worker processes `deadlift worker` runs (auto: one per CPU available); "
        "with more than one, it supervises them and restarts any that dies",
    )
    fetch_batch: int = Field(128, gt=0, description="messages pulled per fetch")
    idle_pull_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description=(
            "how long an idle step's pull request waits for an event before it is renewed: "
            "longer costs less idle CPU per step (events arrive at once either way)"
        ),
    )
    idle_cold_s: float = Field(
        30.0,
        ge=0,
        description=(
            "how long a step stays idle before it goes cold: it stops pulling and waits "
            "for its next event to ring a subscription, so idle steps cost nothing "
            "(0: never; the first event on a cold step takes one round trip more)"
        ),
    )
    cold_recheck_s: float = Field(
        600.0,
        gt=0,
        description="how often a cold step checks its consumer anyway (a safety net)",
    )
    ack_wait_s: float = Field(30.0, gt=0, description="JetStream ack wait per delivery")
    duplicate_window_s: float = Field(
        120.0, gt=0, description="JetStream de-duplication window for Nats-Msg-Id"
    )
    stream_max_age_s: float = Field(
        7 * 24 * 3600.0, gt=0, description="how long events are kept in Deadlift's streams"
    )
    stream_replicas: int = Field(
        1,
        ge=1,
        le=5,
        description="replicas of DEADLIFT_EVENTS/STEPS/DLQ (3 on a 3-node cluster; 1 standalone)",
    )
    shutdown_timeout_s: float = Field(
        20.0, gt=0, description="how long shutdown waits for in-flight events"
    )
    probe_timeout_s: float = Field(
        10.0,
        gt=0,
        description="deadline for instantiating a module (its start function) in the probe "
        "subprocess, at push and at a worker's first load",
    )
    watchdog_grace_s: float = Field(
        5.0,
        gt=0,
        description="how long past its timeout a module call may run before the worker "
        "counts it as stuck, reports unhealthy and exits",
    )
    max_hops: int = Field(
        100,
        ge=1,
        description="largest hop count (step outputs and emitted events so far in the run) "
        "an event may have to run a step; over it, the event is dead-lettered (kind hops): "
        "stops loops and event storms. A step declaring loop: {max_hops: N} uses N instead",
    )
    log_level: str = Field("INFO", description="Python logging level")
