"""One validation for every name a user hands Deadlift: subjects, names, versions, header values.

Each name ends up somewhere with stricter rules than Python strings: a subject in
the NATS protocol's control line (a newline there ends the line and the rest is
read as another command; a line over the server's 4 KiB limit closes the
connection), an org, workflow or step name inside subjects, consumer names and
KV keys, a version inside a KV key, a header value in a message. So every entry
point (workflow files, CLI flags, library functions that take them) checks them
here, once, before anything reaches nats-py, and refuses with a
:class:`~deadlift.errors.ConfigError` naming the field and what is allowed.

The rules (see the README, "Names and subjects"):

* **Subjects**: 1 to :data:`SUBJECT_MAX_BYTES` (256) bytes of printable ASCII
  (``!`` to ``~``: no spaces, tabs, control characters or non-ASCII), tokens
  separated by single dots (no empty token: no leading or trailing dot, no
  ``..``). ``*`` and ``>`` only as whole tokens, ``>`` only last, and only where
  wildcards are allowed (triggers, ``emit`` patterns, ``tail``); never in a
  subject that is published to. This is NATS's own grammar (ADR-6) made strict.
* **Names** (orgs, workflows, steps, modules): ``[a-z][a-z0-9_]*`` with single
  ``-`` between parts, at most 64 characters: a name becomes a subject token, a
  consumer name (``org--workflow--step``) and a KV key.
* **Versions**: 1 to 64 ASCII letters and digits, in parts joined by single
  ``.``, ``_`` or ``-`` (``1``, ``2.0.1``, ``v1.2-rc.1``); not ``latest``, which
  means the newest version.
* **Header values** from users (``--id``, ``--type``): no control characters
  (CR and LF would end the header block, NUL and the rest are invisible).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping

from deadlift.errors import ConfigError

# 256 bytes: far below the server's 4 KiB control line, which must also hold the
# command, the reply inbox and the sizes, with room for what Deadlift derives
# from a subject (a Nats-Msg-Id of `<32-hex id>:<subject>`, dead-letter headers),
# and above Deadlift's own longest subjects: `deadlift.step.<org>.<workflow>.<step>`
# with three 64-character names is 208 bytes.
SUBJECT_MAX_BYTES = 256
NAME_MAX = 64
VERSION_MAX = 64

NAME_PATTERN = r"^[a-z][a-z0-9_]*(-[a-z0-9_]+)*$"
VERSION_PATTERN = r"^[A-Za-z0-9]+([._-][A-Za-z0-9]+)*$"
# A module reference in a workflow: NAME, NAME@VERSION (or NAME@latest), sha256:<hex>;
# a guest's module accepted through an integration is OWNER/NAME[@VERSION].
MODULE_REF_PATTERN = (
    r"^(sha256:[0-9a-f]{64}|([a-z][a-z0-9_]*(-[a-z0-9_]+)*/)?"
    r"[a-z][a-z0-9_]*(-[a-z0-9_]+)*(@[A-Za-z0-9]+([._-][A-Za-z0-9]+)*)?)$"
)
RESERVED_VERSIONS = frozenset({"latest"})

NAME_RULE = "lowercase letters, digits, '_' and single '-', starting with a letter, at most 64"
VERSION_RULE = (
    "ASCII letters and digits in parts joined by single '.', '_' or '-' "
    "(like 1, 2.0.1 or v1.2-rc.1), at most 64"
)
SUBJECT_RULE = (
    f"subjects are 1 to {SUBJECT_MAX_BYTES} bytes of printable ASCII without spaces, "
    "in tokens separated by single dots"
)

# Printable ASCII but '.', '*' and '>': the characters of a literal token.
_TOKEN = r"[!-)+-\-/-=?-~]+"
_LITERAL = re.compile(rf"{_TOKEN}(\.{_TOKEN})*")
_NAME = re.compile(NAME_PATTERN.strip("^$"))
_VERSION = re.compile(VERSION_PATTERN.strip("^$"))
_MODULE_REF = re.compile(MODULE_REF_PATTERN.strip("^$"))
_PRINTABLE = re.compile(r"[!-~]+")
# Control characters (C0, DEL, C1) and Unicode line/paragraph separators.
_UNSAFE_TEXT = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def shown(value: object, limit: int = 48) -> str:
    """``value`` for an error message: one line (``repr`` escapes controls), long ones cut."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, str | bytes) else len(text)
    return f"{text[: limit - 1]}… ({size} characters)"


def describe_char(char: str) -> str:
    """A character as an error message names it."""
    names = {
        "\n": "a newline (\\n)",
        "\r": "a carriage return (\\r)",
        "\t": "a tab (\\t)",
        "\x00": "a NUL byte (\\x00)",
        " ": "a space",
        "\x1b": "an escape character (\\x1b)",
    }
    if char in names:
        return names[char]
    code = f"U+{ord(char):04X}"
    if ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F:
        return f"a control character ({char!r}, {code})"
    name = unicodedata.name(char, "")
    return f"the non-ASCII character {char!r} ({code}{' ' + name if name else ''})"


def _first_bad(value: str, allowed: re.Pattern[str]) -> tuple[int, str] | None:
    for i, char in enumerate(value):
        if not allowed.fullmatch(char):
            return i, char
    return None


def check_subject(subject: object, *, field: str = "subject", wildcards: bool = False) -> str:
    """Validate a NATS subject; return it unchanged.

    ``wildcards``: whether ``*`` and ``>`` tokens are allowed (subscriptions and
    patterns), or not (a subject that is published to).

    Raises:
        ConfigError: naming ``field``, the subject and what is wrong with it.
    """
    if not isinstance(subject, str):
        raise ConfigError(f"{_at(field)}a subject must be text, not {type(subject).__name__}")
    if len(subject) <= SUBJECT_MAX_BYTES and _LITERAL.fullmatch(subject):
        return subject  # the common case: no wildcard, nothing to explain
    if not subject:
        raise ConfigError(f"{_at(field)}the subject is empty; {SUBJECT_RULE}")
    size = len(subject.encode("utf-8", "surrogatepass"))
    if size > SUBJECT_MAX_BYTES:
        raise ConfigError(
            f"{_at(field)}subject {shown(subject)} is {size} bytes, over the limit of "
            f"{SUBJECT_MAX_BYTES}; {SUBJECT_RULE}"
        )
    bad = _first_bad(subject, _PRINTABLE)
    if bad is not None:
        position, char = bad
        what = describe_char(char)
        if char.isspace():
            what = f"whitespace, {what},"
        raise ConfigError(
            f"{_at(field)}subject {shown(subject)} contains {what} at position {position}; "
            f"{SUBJECT_RULE}"
        )
    _check_tokens(subject, subject.split("."), field=field, wildcards=wildcards)
    return subject


def _check_tokens(subject: str, tokens: list[str], *, field: str, wildcards: bool) -> None:
    if "" in tokens:
        where = (
            "starts with a dot (an empty token)"
            if tokens[0] == ""
            else "ends with a dot (an empty token)"
            if tokens[-1] == ""
            else "has an empty token ('..')"
        )
        raise ConfigError(f"{_at(field)}subject {shown(subject)} {where}; {SUBJECT_RULE}")
    for i, token in enumerate(tokens):
        if token in ("*", ">"):
            if not wildcards:
                raise ConfigError(
                    f"{_at(field)}subject {shown(subject)} holds the wildcard {token!r}; "
                    "wildcards are not allowed here (a message is published to one exact subject)"
                )
            if token == ">" and i != len(tokens) - 1:
                raise ConfigError(
                    f"{_at(field)}subject {shown(subject)}: misplaced wildcard: '>' is allowed "
                    "only as the last token"
                )
        elif "*" in token or ">" in token:
            raise ConfigError(
                f"{_at(field)}subject {shown(subject)}: misplaced wildcard: token {shown(token)} "
                "mixes a wildcard with other characters; '*' and '>' are allowed only as whole "
                "tokens"
            )


def _check_text(
    value: object, *, field: str, what: str, limit: int, rule: str, pattern: re.Pattern[str]
) -> str:
    """The checks names and versions share: text, not empty, not too long, the pattern."""
    if not isinstance(value, str):
        raise ConfigError(f"{_at(field)}a {what} must be text, not {type(value).__name__}")
    if not value:
        raise ConfigError(f"{_at(field)}the {what} is empty; use {rule}")
    if len(value) > limit:
        raise ConfigError(
            f"{_at(field)}{what} {shown(value)} is {len(value)} characters, over the limit of "
            f"{limit}; use {rule}"
        )
    if value in RESERVED_VERSIONS and what == "version":
        raise ConfigError(
            f"{_at(field)}{value!r} is reserved (NAME@{value} means the newest version); "
            "pick another version"
        )
    if not pattern.fullmatch(value):
        raise ConfigError(f"{_at(field)}invalid {what} {shown(value)}{_why(value)}; use {rule}")
    return value


def check_name(value: object, *, field: str = "name") -> str:
    """Validate an org, workflow, step or module name; return it unchanged.

    Raises:
        ConfigError: naming ``field``, the value and the rule.
    """
    return _check_text(
        value, field=field, what="name", limit=NAME_MAX, rule=NAME_RULE, pattern=_NAME
    )


def check_version(value: object, *, field: str = "version") -> str:
    """Validate a module version; return it unchanged.

    Raises:
        ConfigError: naming ``field``, the value and the rule.
    """
    return _check_text(
        value, field=field, what="version", limit=VERSION_MAX, rule=VERSION_RULE, pattern=_VERSION
    )


def check_module_ref(value: object, *, field: str = "module") -> str:
    """Validate ``[OWNER/]NAME``, ``[OWNER/]NAME@VERSION`` (``@latest``) or ``sha256:<64 hex>``.

    Raises:
        ConfigError: naming ``field`` and the accepted forms.
    """
    if not isinstance(value, str):
        raise ConfigError(
            f"{_at(field)}a module reference must be text, not {type(value).__name__}"
        )
    name, _, version = value.partition("@")
    too_long = not value.startswith("sha256:") and (
        any(len(part) > NAME_MAX for part in name.split("/")) or len(version) > VERSION_MAX
    )
    if too_long or not _MODULE_REF.fullmatch(value):
        raise ConfigError(
            f"{_at(field)}invalid module reference {shown(value)}{_why(value)}; use NAME, "
            "NAME@VERSION, OWNER/NAME@VERSION (a guest's accepted module) or "
            "sha256:<64 lowercase hex digits> (names: "
            f"{NAME_RULE}; versions: {VERSION_RULE})"
        )
    return value


def check_workflow_ref(value: object, *, field: str = "workflow") -> str:
    """Validate a workflow named as ``NAME`` or ``ORG.NAME``; return it unchanged.

    Raises:
        ConfigError: naming ``field`` and the rule.
    """
    if not isinstance(value, str):
        raise ConfigError(
            f"{_at(field)}a workflow must be named by text, not {type(value).__name__}"
        )
    parts = value.split(".")
    if len(parts) > 2:
        raise ConfigError(
            f"{_at(field)}invalid workflow {shown(value)}: use NAME or ORG.NAME ({NAME_RULE})"
        )
    for part in parts:
        try:
            check_name(part, field=field)
        except ConfigError:
            raise ConfigError(
                f"{_at(field)}invalid workflow {shown(value)}{_why(value)}: use NAME or ORG.NAME "
                f"({NAME_RULE})"
            ) from None
    return value


def check_token(value: object, *, field: str, max_length: int = 255) -> str:
    """Validate a bare identifier (an exported function, a host function name).

    1 to ``max_length`` characters of printable ASCII without spaces.

    Raises:
        ConfigError: naming ``field`` and the rule.
    """
    rule = f"use 1 to {max_length} printable ASCII characters without spaces"
    if not isinstance(value, str):
        raise ConfigError(f"{_at(field)}must be text, not {type(value).__name__}")
    if not value or len(value) > max_length:
        raise ConfigError(f"{_at(field)}{shown(value)} is {len(value)} characters; {rule}")
    bad = _first_bad(value, _PRINTABLE)
    if bad is not None:
        raise ConfigError(f"{_at(field)}{shown(value)} contains {describe_char(bad[1])}; {rule}")
    return value


def check_header_value(value: object, *, field: str) -> str:
    """Validate a header value that came from a user; return it unchanged.

    Raises:
        ConfigError: the value holds a control character (CR and LF would end the
            header block; NUL and the others are invisible in every tool).
    """
    if not isinstance(value, str):
        raise ConfigError(f"{_at(field)}must be text, not {type(value).__name__}")
    found = _UNSAFE_TEXT.search(value)
    if found:
        raise ConfigError(
            f"{_at(field)}{shown(value)} contains {describe_char(found.group())} at position "
            f"{found.start()}; header values may not hold control characters or line breaks"
        )
    if value != value.strip():
        raise ConfigError(
            f"{_at(field)}{shown(value)} has leading or trailing whitespace, which NATS would strip"
        )
    return value


_HEADER_NAME = re.compile(r"[!-9;-~]+")  # printable ASCII but ':'
_LINE_BREAK = re.compile(r"[\r\n]")


def check_headers(headers: object, *, field: str = "headers") -> None:
    """Validate message headers before they reach nats-py: what would corrupt the protocol.

    Names must be printable ASCII without ':'; values must not hold CR or LF,
    which would end the header block (the rest would be read as other headers
    or as the body). Values that came from users should also pass
    :func:`check_header_value`, which is stricter.

    Raises:
        ConfigError: naming the header at fault.
    """
    if headers is None:
        return
    if not isinstance(headers, Mapping):
        raise ConfigError(f"{_at(field)}must be a mapping of names to values")
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise ConfigError(
                f"{_at(field)}invalid header name {shown(name)}: use printable ASCII without "
                "spaces or ':'"
            )
        if not isinstance(value, str):
            raise ConfigError(f"{_at(field)}{name}: must be text, not {type(value).__name__}")
        found = _LINE_BREAK.search(value)
        if found:
            raise ConfigError(
                f"{_at(field)}{name}: {shown(value)} contains {describe_char(found.group())} at "
                f"position {found.start()}; header values may not hold line breaks"
            )


def _at(field: str) -> str:
    """The prefix naming the field at fault ("" when the caller names it itself)."""
    return f"{field}: " if field else ""


def _why(value: str) -> str:
    """The first character that makes ``value`` invalid, when it is one that hides."""
    bad = _first_bad(value, _PRINTABLE)
    return f" (it contains {describe_char(bad[1])})" if bad else ""
