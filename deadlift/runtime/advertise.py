"""A worker advertises itself as a NATS micro service: ``deadlift workers`` and health find it."""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from deadlift.model.topology import WORKER_DESCRIBE_PREFIX, WORKER_SERVICE


def _version() -> str:
    try:
        return version("deadlift")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0.0.0"


async def advertise(nc: Client, describe: Callable[[], dict[str, Any]]) -> Service:
    """Register a micro service answering ``describe()``; stop it with ``await service.stop()``."""
    first = describe()
    service = await add_service(
        nc,
        name=WORKER_SERVICE,
        version=_version(),
        description="Deadlift worker: runs workflow steps",
        metadata={"pid": str(first["pid"]), "host": str(first["host"])},
    )

    async def answer(request: Request) -> None:
        await request.respond(json.dumps(describe(), default=str).encode())

    await service.add_endpoint(
        name="describe", subject=f"{WORKER_DESCRIBE_PREFIX}.{service.id}", handler=answer
    )
    return service
