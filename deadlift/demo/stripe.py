"""Stripe's host functions in the demo: purchase history and an email outbox.

A host org offers these to guest modules it runs. They are plain Python,
called locally by the module — no HTTP hop.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from deadlift import HostCall, HostFunctionError, host_function

DAY = 86_400

# Stripe-side data: customer → (category, amount, days ago) of past purchases.
PURCHASES: dict[str, list[tuple[str, float, int]]] = {
    "alice": [("coffee", 4.5, d) for d in range(1, 13)] + [("books", 20.0, 3)],
    "bob": [("coffee", 3.9, d) for d in (2, 5, 9, 20)],
    "carol": [("books", 15.0, d) for d in (1, 6, 11, 16, 21, 40, 45, 50, 55, 60, 65)],
    "dave": [("tea", 6.0, d) for d in range(1, 29, 3)],
}

_outbox: list[dict[str, Any]] = []
_outbox_lock = threading.Lock()


def outbox() -> list[dict[str, Any]]:
    """The emails sent so far (a copy)."""
    with _outbox_lock:
        return list(_outbox)


def clear_outbox() -> None:
    """Forget sent emails (between demo runs in one process)."""
    with _outbox_lock:
        _outbox.clear()


@host_function
def past_purchases(call: HostCall, request: Any) -> Any:
    """A customer's purchases: ``{"customer"}`` → ``{"purchases": [{category, amount, ts}]}``."""
    if not isinstance(request, dict) or not isinstance(request.get("customer"), str):
        raise HostFunctionError('past_purchases expects {"customer": "<id>"}')
    now = int(time.time())
    return {
        "purchases": [
            {"category": category, "amount": amount, "ts": now - days * DAY}
            for category, amount, days in PURCHASES.get(request["customer"], [])
        ]
    }


@host_function
def send_email(call: HostCall, request: Any) -> Any:
    """Send an email through Stripe: ``{"to", "subject", "body"}`` → ``{"id"}``."""
    if not isinstance(request, dict) or not all(
        isinstance(request.get(k), str) for k in ("to", "subject", "body")
    ):
        raise HostFunctionError('send_email expects {"to", "subject", "body"} strings')
    with _outbox_lock:
        email_id = f"em_{len(_outbox) + 1:04d}"
        _outbox.append({**request, "id": email_id, "run": call.run, "org": call.org})
    call.logger.info("send_email %s to %s (run %s)", email_id, request["to"], call.run[:12])
    return {"id": email_id}
