"""An org's subjects and event schemas as an AsyncAPI 3.0.0 document.

Built from the org manifest alone (``deadlift contract asyncapi``): a channel
per integration event the org sends or receives, addressed as the org sees it
(the sender's subject, or where the import delivers it), with the event's JSON
Schema as the message payload and a ``send`` or ``receive`` operation; and a
channel without a declared payload for each of the org's own subjects, declared
exports and imports. NATS wildcards (``*``, ``>``) stay as they are in addresses.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from deadlift.model.integrations import EventContract, Integration, schema_uri
from deadlift.model.orgs import OrgManifest
from deadlift.wire import events

ASYNCAPI = "3.0.0"
# What travels: Deadlift events are msgpack (binary content mode of the CloudEvents
# NATS binding); the payload schema describes the data, as JSON Schema does for JSON.
CONTENT_TYPE = events.MSGPACK
_ID_UNSAFE = re.compile(r"[^\w.\-]")


def document(manifest: OrgManifest, org: str) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of ``org``'s subjects (a plain dict, ready for JSON or YAML).

    ``info.version`` is a digest of what the document declares: two exports of
    one contract are equal, and any change to it shows.

    Raises:
        ConfigError: ``org`` is not in the manifest.
    """
    declared = manifest.org(org)
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for key, item in manifest.integrations_of(org).items():
        for name, event in item.events.items():
            cid = f"{key}.{name}"
            sends = event.sender == org
            channels[cid] = _event_channel(key, item, name, event, sends)
            messages[cid] = _message(key, name, event)
            if event.payload_schema is not None:
                schemas[cid] = event.payload_schema
            operations[f"{'send' if sends else 'receive'}.{cid}"] = {
                "action": "send" if sends else "receive",
                "channel": {"$ref": f"#/channels/{cid}"},
                "messages": [{"$ref": f"#/channels/{cid}/messages/{name}"}],
                "summary": (
                    f"{org} sends {name} to {item.receiver(event)}"
                    if sends
                    else f"{org} receives {name} from {event.sender}"
                ),
            }
    taken = {c["address"] for c in channels.values()}
    plain = [
        (f"{org}.>", f"{org}'s own subjects"),
        *((s, f"a subject of {org}'s own") for s in declared.subjects),
        *(
            (e.subject, f"exported by {org} to {', '.join(e.to)}; no payload declared")
            for e in declared.exports
        ),
        *(
            (i.local_subject, f"{i.org}'s {i.subject}, imported; no payload declared")
            for i in declared.imports
        ),
    ]
    for address, description in plain:
        if address not in taken:
            taken.add(address)
            channels[_unique(channels, "subjects." + _channel_id(address))] = {
                "address": address,
                "description": description,
            }
    body: dict[str, Any] = {
        "asyncapi": ASYNCAPI,
        "id": f"urn:deadlift:org:{org}",
        "info": {
            "title": f"Deadlift: the events of org {org}",
            "version": "",
            "description": (
                declared.description
                or f"What {org} sends and receives, from the Deadlift org manifest."
            ),
        },
        "defaultContentType": CONTENT_TYPE,
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    body["info"]["version"] = f"sha256-{digest[:12]}"
    return body


def _event_channel(
    key: str, item: Integration, name: str, event: EventContract, sends: bool
) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "address": event.subject if sends else event.local_subject,
        "title": f"{key}: {name}",
        "messages": {name: {"$ref": f"#/components/messages/{key}.{name}"}},
        "x-deadlift-integration": key,
        "x-deadlift-from": event.sender,
        "x-deadlift-to": item.receiver(event),
    }
    if event.description:
        channel["description"] = event.description
    return channel


def _message(key: str, name: str, event: EventContract) -> dict[str, Any]:
    schema = event.payload_schema
    message: dict[str, Any] = {
        "name": name,
        "title": str(schema.get("title") or name) if schema else name,
        "contentType": CONTENT_TYPE,
        "headers": _headers(schema_uri(key, name) if schema else None),
    }
    summary = event.description or (schema.get("description") if schema else None)
    if summary:
        message["summary"] = str(summary)
    if schema is not None:
        message["payload"] = {"$ref": f"#/components/schemas/{key}.{name}"}
    return message


def _headers(dataschema: str | None) -> dict[str, Any]:
    """The CloudEvents attributes an event carries as NATS headers."""
    properties: dict[str, Any] = {
        f"{events.PREFIX}specversion": {"const": events.SPECVERSION},
        **{f"{events.PREFIX}{name}": {"type": "string"} for name in ("id", "source", "type")},
        f"{events.PREFIX}time": {"type": "string", "format": "date-time"},
        f"{events.PREFIX}datacontenttype": {"const": CONTENT_TYPE},
        f"{events.PREFIX}{events.RUN}": {"type": "string"},
        events.TRACEPARENT: {"type": "string"},
    }
    if dataschema is not None:
        properties[f"{events.PREFIX}dataschema"] = {"const": dataschema}
    required = ["specversion", "id", "source", "type", *(["dataschema"] if dataschema else [])]
    return {
        "type": "object",
        "properties": properties,
        "required": [f"{events.PREFIX}{name}" for name in required],
    }


def _channel_id(subject: str) -> str:
    """A channel id for a subject (ids allow letters, digits, ``.``, ``-``, ``_``)."""
    readable = ".".join({">": "all", "*": "any"}.get(t, t) for t in subject.split("."))
    return _ID_UNSAFE.sub("_", readable)


def _unique(taken: dict[str, Any], wanted: str) -> str:
    found, n = wanted, 1
    while found in taken:
        n += 1
        found = f"{wanted}_{n}"
    return found
