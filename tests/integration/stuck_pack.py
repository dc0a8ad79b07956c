"""Host functions for the time attacks (test_attack_time.py), a ``--host-functions`` pack.

``past_purchases`` blocks forever in Python when ``DEADLIFT_TEST_HANG=1``: a
module call that Extism's timeout cannot interrupt (it only interrupts Wasm
code), i.e. a stuck module thread. It first creates the file named by
``DEADLIFT_TEST_HANG_MARKER``, so a test knows the call is under way. Otherwise
it answers ten similar purchases, so ``before_charge_action`` sends an email and
outputs a discount.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from deadlift import HostCall, host_function

DAY = 86_400


@host_function
def past_purchases(call: HostCall, request: Any) -> Any:
    """Ten coffee purchases in the last ten days (or never returns, see above)."""
    if os.environ.get("DEADLIFT_TEST_HANG") == "1":
        marker = os.environ.get("DEADLIFT_TEST_HANG_MARKER")
        if marker:
            Path(marker).write_text(call.event_id)
        threading.Event().wait()  # forever: no timeout reaches a thread blocked here
    now = int(time.time())
    return {
        "purchases": [
            {"category": "coffee", "amount": 4.0, "ts": now - d * DAY} for d in range(1, 11)
        ]
    }


@host_function
def send_email(call: HostCall, request: Any) -> Any:
    """Pretend to send it."""
    return {"id": f"email-{call.event_id[:8]}"}
