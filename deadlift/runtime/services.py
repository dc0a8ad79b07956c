"""What the built-in host functions of a step work with, scoped to the step's org.

``emit`` publishes through the step's publisher to its declared subjects,
``http_request`` follows the step's allow-list, ``config_get``/``secret_get``
read the org's values from the manifest, and ``kv_*`` use the org's state
bucket. The org is the workflow's, already checked against the connection's
account by the worker.
"""

from __future__ import annotations

from typing import Any

from nats.js import JetStreamContext

from deadlift.bus import buckets
from deadlift.bus.publisher import Publisher
from deadlift.model import topology
from deadlift.model.orgs import OrgManifest
from deadlift.model.workflow import Step, Workflow
from deadlift.runtime import telemetry
from deadlift.runtime.builtins import (
    CONFIG_SERVICE,
    EMIT_SERVICE,
    HTTP_SERVICE,
    SECRETS_SERVICE,
    STATE_SERVICE,
    EmitTarget,
)
from deadlift.runtime.http_policy import http_policy
from deadlift.settings import Settings
from deadlift.wasm.hostfns import HostCall
from deadlift.wire import events


class StateBuckets:
    """Each org's KV state bucket, opened (or created) once."""

    def __init__(self, js: JetStreamContext, *, replicas: int = 1) -> None:
        self.js = js
        self.replicas = replicas
        self._open: dict[str, Any] = {}

    async def of(self, org: str) -> Any:
        """The org's bucket."""
        if org not in self._open:
            bucket = topology.state_bucket(org)
            self._open[org] = await buckets.key_value(
                self.js, bucket, history=1, replicas=self.replicas
            )
        return self._open[org]


async def step_services(
    workflow: Workflow,
    step: Step,
    *,
    publisher: Publisher,
    settings: Settings,
    orgs: OrgManifest | None,
    state: StateBuckets,
) -> dict[str, Any]:
    """The services one step's built-in host functions use."""
    org = workflow.org
    services: dict[str, Any] = {
        EMIT_SERVICE: EmitTarget(tuple(step.emit), emitter(workflow, step, publisher)),
        # Extism cannot interrupt a blocking host function: the policy's deadline
        # keeps an HTTP call within the step's timeout.
        HTTP_SERVICE: http_policy(
            step.allowed_hosts, call_timeout_ms=step.timeout_ms or settings.default_timeout_ms
        ),
    }
    if orgs is not None and org in orgs.orgs:
        declared = orgs.orgs[org]
        services[CONFIG_SERVICE] = dict(declared.config)
        services[SECRETS_SERVICE] = {k: v.resolve(k) for k, v in declared.secrets.items()}
    if any(name.startswith("kv_") for name in step.host_functions):
        services[STATE_SERVICE] = await state.of(org)
    return services


def emitter(workflow: Workflow, step: Step, publisher: Publisher) -> Any:
    """How ``emit`` publishes for a step: the step's encoder, deterministic ids."""
    encoder = events.OutputEncoder.for_step(workflow.org, workflow.name, step.name, kind="emit")

    async def publish(call: HostCall, subject: str, data: Any) -> None:
        call.emitted += 1
        # Deterministic: a retried call emits with the same ids (deduplicated).
        event_id = topology.emitted_id(
            call.event_id, workflow.key, step.name, call.emitted, call.origin
        )
        headers, body = encoder.encode(
            data,
            id=event_id,
            time=events.now_rfc3339(),
            run=call.run,
            # Emitted events belong to the run's trace, like the step's output.
            traceparent=(
                telemetry.traceparent_of(call.trace_context)
                if call.trace_context is not None
                else call.traceparent
            ),
            origin=call.origin,
        )
        msg_id = topology.output_msg_id(event_id, subject)
        await publisher.publish(subject, body, headers, msg_id=msg_id)

    return publish
