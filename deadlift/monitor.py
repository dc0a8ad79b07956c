"""Seeing a live system: workers as NATS micro services.

Each worker registers the micro service ``deadlift-worker`` (``$SRV.PING``,
``$SRV.INFO``, ``$SRV.STATS``) with an endpoint that describes it: org, steps,
modules and counts.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

if TYPE_CHECKING:
    from deadlift.worker import Worker

SERVICE = "deadlift-worker"
DESCRIBE_PREFIX = "deadlift.workers"


async def advertise(worker: Worker) -> Service:
    """Register ``worker`` as a micro service; stop it with ``await service.stop()``."""
    from deadlift import __version__

    service = await add_service(
        worker.nc,
        name=SERVICE,
        version=__version__,
        description="Deadlift worker: runs workflow steps",
        metadata={"pid": str(worker.describe()["pid"]), "host": worker.describe()["host"]},
    )

    async def describe(request: Request) -> None:
        await request.respond(json.dumps(worker.describe(), default=str).encode())

    await service.add_endpoint(
        name="describe", subject=f"{DESCRIBE_PREFIX}.{service.id}", handler=describe
    )
    return service


def describe_payload(data: bytes) -> dict[str, Any]:
    """Decode a worker's ``describe`` answer."""
    result: dict[str, Any] = json.loads(data)
    return result
