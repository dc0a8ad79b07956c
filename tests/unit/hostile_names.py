"""Hostile names, subjects and versions, and what a refusal of them must look like.

Shared by the parser tests (tests/unit/test_names.py) and the tests that hand the
same inputs to the library, the registry and the CLI against a real server
(tests/integration/test_attack_names.py).
"""

from __future__ import annotations

HUGE = "attack." + "x" * 6000  # 6 KB: over the server's 4 KiB control line

# Subjects no message may be published to, and the words the refusal must hold.
BAD_SUBJECTS = [
    ("attack.a\x00b", "NUL"),
    ("attack.a\nb", "newline"),
    ("attack.a\r\nPUB evil 1", "carriage return"),
    ("attack.a\tb", "tab"),
    ("attack.a b", "space"),
    (" attack.ok", "space"),
    ("attack.ok ", "space"),
    (HUGE, "over the limit of 256"),
    ("attack.café", "non-ASCII"),
    ("attack.\u2028x", "non-ASCII"),
    ("attack.\x1b[31m", "escape"),
    ("attack.\x7f", "control character"),
    ("attack..ok", "empty token"),
    (".attack.ok", "starts with a dot"),
    ("attack.ok.", "ends with a dot"),
    ("attack.>.ok", "wildcard"),
    ("attack.o>k", "wildcard"),
    ("attack.*", "wildcards are not allowed"),
    ("attack.>", "wildcards are not allowed"),
    ("", "empty"),
]
# Patterns (wildcards allowed) that are still not subjects.
BAD_PATTERNS = [
    (s, why) for s, why in BAD_SUBJECTS if why not in ("wildcards are not allowed",)
] + [("attack.>.>", "misplaced wildcard"), ("attack.**", "misplaced wildcard")]
BAD_NAMES = [
    "add\x00ten",
    "add\nten",
    "add\rten",
    "add\tten",
    "add ten",
    "add_ten ",
    "Add_ten",
    "adé",
    "a" * 65,
    "x" * 6000,
    "add--ten",
    "add.ten",
    "-add",
    "",
]
BAD_VERSIONS = [
    "1\x00",
    "1\n",
    "1\r",
    "1\t2",
    "1 2",
    "1..2",
    "1.",
    ".1",
    "-1",
    "1/2",
    "é",
    "v" * 65,
    "latest",
    "",
]


def one_line(message: str) -> None:
    """A refusal a terminal shows as one line: no raw line breaks or control characters."""
    text = message.rstrip("\n")
    assert text and not any(c in text for c in "\n\r\x00\x1b\t\x0b\x0c\u2028"), repr(message)
    assert len(text) < 600, f"refusal is {len(text)} characters: {text[:200]!r}"
