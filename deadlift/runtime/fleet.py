"""A fleet: one process serving many orgs, each with a worker of its own.

A host running integrations for many customers would otherwise need a worker
process per org. A :class:`Fleet` runs one :class:`~deadlift.runtime.worker.Worker`
per org in one process, and each org keeps what a process of its own gives it:

* its own NATS connection, made with that org's credentials (the manifest's
  development user, or ``<org>.creds`` in a credentials directory), so its own
  account — registry, streams, state buckets, dead letters and limits;
* its own worker: module host and instances, watchdog, registry view, and the
  micro-service advertisement (``deadlift workers`` as that org lists only it);
* the config and secrets the manifest gives that org: a worker runs only the
  workflows of its connection's account, whatever a document claims.

What the orgs share is the process and one pool of threads for module calls.
Orgs start concurrently, a few at a time; one that cannot start (refused
credentials, say) is reported by name and the others are served.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from deadlift.bus.connection import DeadliftClient
from deadlift.bus.identity import whoami
from deadlift.errors import ConfigError, DeadliftError, PermissionDeniedError
from deadlift.model.orgs import OrgManifest, account_name
from deadlift.runtime.context import StepReport
from deadlift.runtime.startup import connect_patiently, refused, start_patiently
from deadlift.runtime.threads import default_threads
from deadlift.runtime.watchdog import Stuck
from deadlift.runtime.worker import Worker
from deadlift.settings import Settings
from deadlift.wasm.hostfns import HostFunction

log = logging.getLogger("deadlift.fleet")

START_AT_ONCE = 8
"""Orgs whose workers connect and start at the same time."""

OnStuck = Callable[[str, list[Stuck]], None]
"""Called (in a watchdog thread) with the org and what is stuck."""


def org_names(manifest: OrgManifest, orgs: Sequence[str]) -> list[str]:
    """``orgs`` checked against the manifest, in order, each once.

    Raises:
        ConfigError: none given, or one the manifest does not declare.
    """
    names = list(dict.fromkeys(orgs))
    if not names:
        raise ConfigError("no org to serve: name at least one org of the org manifest")
    unknown = [name for name in names if name not in manifest.orgs]
    if unknown:
        raise ConfigError(
            f"not in the org manifest: {', '.join(unknown)} (its orgs: {', '.join(manifest.orgs)})"
        )
    return names


def org_settings(
    settings: Settings, manifest: OrgManifest, org: str, *, creds_dir: str | Path | None = None
) -> Settings:
    """``settings`` with ``org``'s credentials: ``creds_dir/<org>.creds``, else the
    manifest's first password user of the org (an admin first; development).

    Raises:
        ConfigError: the credentials file is missing, or the org has no password user.
    """
    base = settings.model_copy(
        update={"org": org, "creds": None, "user": None, "password": None, "token": None}
    )
    if creds_dir is not None:
        path = Path(creds_dir) / f"{org}.creds"
        if not path.is_file():
            raise ConfigError(
                f"no credentials file {path} for org {org} (--creds-dir holds one "
                "<org>.creds per org served)"
            )
        return base.model_copy(update={"creds": str(path)})
    users = sorted(
        (u for u in manifest.org(org).users if u.user and u.password),
        key=lambda u: u.role != "admin",
    )
    if not users:
        raise ConfigError(
            f"org {org} has no password user in the org manifest; pass --creds-dir DIR "
            f"holding {org}.creds"
        )
    return base.model_copy(update={"user": users[0].user, "password": users[0].password})


class Fleet:
    """One :class:`Worker` per org in this process, until :meth:`shutdown`.

    Args:
        orgs: the orgs to serve, by name (each must be in ``manifest``).
        manifest: the org manifest: credentials (without ``creds_dir``), and each
            worker's ``config_get`` / ``secret_get`` values.
        settings: the server, limits and batches; each org's credentials replace
            whatever credentials these hold.
        creds_dir: a directory holding ``<org>.creds`` for every org (production).
        workflows, host_functions, observers, concurrency, advertise: given to
            every org's worker (see :class:`Worker`).
        threads: threads of the one pool every org's module calls run in.
        patience_s: how long an org's worker waits for an unreachable server or a
            JetStream that does not answer yet; refused credentials fail at once.
        on_stuck: called when a module call of an org is stuck (the watchdog
            shuts that org's worker down; ``deadlift worker`` ends the process).
    """

    def __init__(
        self,
        orgs: Sequence[str],
        *,
        manifest: OrgManifest,
        settings: Settings | None = None,
        creds_dir: str | Path | None = None,
        workflows: Sequence[str] = (),
        host_functions: Mapping[str, HostFunction] | None = None,
        observers: Sequence[Callable[[StepReport], None]] = (),
        concurrency: int | None = None,
        threads: int | None = None,
        advertise: bool = True,
        patience_s: float = 0.0,
        on_stuck: OnStuck | None = None,
    ) -> None:
        self.orgs = org_names(manifest, orgs)
        self.manifest = manifest
        self.settings = settings or Settings()
        self.creds_dir = creds_dir
        self.workflows = tuple(workflows)
        self.host_functions = host_functions
        self.observers = tuple(observers)
        self.concurrency = concurrency
        self.advertise = advertise
        self.patience_s = patience_s
        self.on_stuck = on_stuck
        self.threads = threads or default_threads(self.settings)
        self.executor = ThreadPoolExecutor(
            max_workers=self.threads, thread_name_prefix="deadlift-wasm"
        )
        self.workers: dict[str, Worker] = {}
        self.failed: dict[str, str] = {}  # org -> why it is not served
        self._started: set[str] = set()
        self._clients: dict[str, DeadliftClient] = {}
        self._starting: asyncio.Future[list[None]] | None = None
        self._shutting_down = False
        self._closed = asyncio.Event()

    async def __aenter__(self) -> Fleet:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    @property
    def serving(self) -> list[str]:
        """The orgs whose workers started, in the order given."""
        return [org for org in self.orgs if org in self._started]

    @property
    def stats(self) -> Counter[str]:
        """Events per outcome, summed over every org's worker."""
        total: Counter[str] = Counter()
        for worker in self.workers.values():
            total.update(worker.stats)
        return total

    def running(self) -> list[str]:
        """Every module call running now, named with its org."""
        return [
            f"{org}: {call}" for org, w in self.workers.items() for call in w.watchdog.running()
        ]

    def stuck(self) -> list[str]:
        """The module calls the watchdogs found stuck, named with their org."""
        return [f"{org}: {s}" for org, w in self.workers.items() for s in w.watchdog.stuck]

    async def start(self) -> None:
        """Connect and start every org's worker, :data:`START_AT_ONCE` at a time.

        An org that cannot start is logged and noted in :attr:`failed`; the
        others are served.

        Raises:
            DeadliftError: no org could be started (each one's reason is named).
        """
        if self._shutting_down:
            raise DeadliftError("this fleet was shut down; make a new one")
        gate = asyncio.Semaphore(START_AT_ONCE)

        async def start_one(org: str) -> None:
            async with gate:
                if not self._shutting_down:
                    await self._start_org(org)

        starting = self._starting = asyncio.gather(*(start_one(org) for org in self.orgs))
        try:
            await starting
        except asyncio.CancelledError:
            if not self._shutting_down:
                raise
            for org in self.orgs:  # shut down while starting
                if org not in self._started and org not in self.failed:
                    self.failed[org] = "shut down before it started"
            return
        if not self.serving:
            reasons = "; ".join(
                f"{org}: {self.failed.get(org, 'not started')}" for org in self.orgs
            )
            raise DeadliftError(f"no org could be served ({reasons})")

    async def _start_org(self, org: str) -> None:
        try:
            settings = org_settings(self.settings, self.manifest, org, creds_dir=self.creds_dir)
            nc = await connect_patiently(settings, within_s=self.patience_s)
            self._clients[org] = nc
            await self._check_identity(nc, org)
            worker = Worker(
                nc,
                settings=settings,
                orgs=self.manifest,
                workflows=self.workflows,
                host_functions=self.host_functions,
                observers=self.observers,
                concurrency=self.concurrency,
                advertise=self.advertise,
                threads=self.threads,
                executor=self.executor,
            )
            if self.on_stuck is not None:
                worker.watchdog.on_stuck = functools.partial(self.on_stuck, org)
            self.workers[org] = worker  # before it starts: a shutdown meanwhile stops it
            await start_patiently(worker, within_s=self.patience_s)
            self._started.add(org)
        except Exception as exc:
            why = str(exc) if isinstance(exc, DeadliftError) else f"{type(exc).__name__}: {exc}"
            if refused(exc):
                why += f" (its credentials: {self._credentials_source(org)})"
            self.failed[org] = why
            log.error("org %s not served: %s", org, why)
            await self._stop_org(org)
            return
        log.info(
            "org %s: worker running %d step(s): %s",
            org,
            len(worker.steps),
            ", ".join(worker.steps) or "none yet",
        )

    def _credentials_source(self, org: str) -> str:
        if self.creds_dir is not None:
            return str(Path(self.creds_dir) / f"{org}.creds")
        return f"a user of org {org} in the org manifest"

    async def _check_identity(self, nc: DeadliftClient, org: str) -> None:
        """Refuse credentials of another account, and a server without accounts."""
        identity = await whoami(nc)
        if identity.single_tenant:
            raise DeadliftError(
                "the server has no accounts (single-tenant): one worker there runs every "
                "org's workflows already; serve several orgs only on a server with an "
                "account per org"
            )
        if identity.account != account_name(org):
            raise PermissionDeniedError(
                f"the credentials for org {org} belong to NATS account {identity.account}, "
                f"not {account_name(org)}; give each org its own credentials"
            )

    async def _stop_org(self, org: str) -> None:
        worker = self.workers.pop(org, None)
        if worker is not None:
            with contextlib.suppress(Exception):
                await worker.shutdown()
        nc = self._clients.pop(org, None)
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.close()

    async def drain(self, timeout: float = 30.0) -> None:
        """Return when no org's worker has an event pending or in flight (see Worker.drain).

        Raises:
            TimeoutError: work is still pending after ``timeout`` seconds.
        """
        await asyncio.gather(*(w.drain(timeout) for w in list(self.workers.values())))

    async def run_until_shutdown(self) -> None:
        """Wait (after :meth:`start`) until :meth:`shutdown` completes."""
        await self._closed.wait()

    async def shutdown(self) -> None:
        """Stop every org's worker (finishing in-flight events), drain their connections,
        and release the thread pool; idempotent, and safe while :meth:`start` runs."""
        if self._shutting_down:
            await self._closed.wait()
            return
        self._shutting_down = True
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._starting
        workers = list(self.workers.items())
        results = await asyncio.gather(*(w.shutdown() for _, w in workers), return_exceptions=True)
        for (org, _), result in zip(workers, results, strict=True):
            if isinstance(result, Exception):
                log.warning("org %s: worker shutdown failed: %s", org, result)
        await asyncio.gather(*(self._drain(org, nc) for org, nc in self._clients.items()))
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._closed.set()

    async def _drain(self, org: str, nc: DeadliftClient) -> None:
        if nc.is_closed:
            return
        try:
            await nc.drain()
        except Exception as exc:  # e.g. the server is restarting: nothing left to flush
            log.warning("org %s: could not drain the connection (%s); closing", org, exc)
            await nc.close()
