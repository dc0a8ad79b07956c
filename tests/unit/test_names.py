"""Hostile names in workflow files: NUL, line breaks, whitespace, huge and non-ASCII text.

Each must be refused by the parser with a ConfigError naming the file, the field
and what is allowed, one line per problem. The same inputs handed to the library
and the CLI against a real server are in tests/integration/test_attack_names.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from deadlift.errors import ConfigError
from deadlift.model.workflow import parse_workflow
from tests.unit.hostile_names import (
    BAD_NAMES,
    BAD_PATTERNS,
    BAD_SUBJECTS,
    BAD_VERSIONS,
    HUGE,
    one_line,
)


def workflow(**fields: Any) -> str:
    """A workflow as YAML (JSON is YAML: every hostile character is escaped in it)."""
    step = {"name": "a", "module": "add_ten", "function": "add_ten"}
    step.update(fields.pop("step", {}))
    doc = {"name": "attack", "org": "acme", "trigger": "attack.in", "steps": [step], **fields}
    return json.dumps(doc)


def refusal(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_workflow(text, source="attack.yaml")
    message = str(caught.value)
    assert message.startswith("attack.yaml: ")
    for line in message.splitlines():  # one line per problem, each on its own line
        one_line(line)
    return message


@pytest.mark.parametrize(("subject", "why"), BAD_PATTERNS)
def test_workflow_trigger_refuses_hostile_subjects(subject: str, why: str) -> None:
    message = refusal(workflow(trigger=subject))
    assert "trigger" in message and why in message


@pytest.mark.parametrize(("subject", "why"), BAD_SUBJECTS)
def test_workflow_publish_refuses_hostile_subjects(subject: str, why: str) -> None:
    message = refusal(workflow(step={"publish": ["attack.out", subject]}))
    assert "step [0] (a).publish" in message and why in message


@pytest.mark.parametrize(("subject", "why"), BAD_PATTERNS)
def test_workflow_emit_refuses_hostile_subjects(subject: str, why: str) -> None:
    message = refusal(workflow(step={"emit": [subject]}))
    assert "step [0] (a).emit" in message and why in message


def test_a_6kb_trigger_is_refused_with_a_short_message() -> None:
    message = refusal(workflow(trigger=HUGE))
    assert "6007 bytes, over the limit of 256" in message
    assert len(message) < 400  # the subject is not echoed whole


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("where", ["name", "org", "step", "next"])
def test_workflow_names_refuse_hostile_names(where: str, name: str) -> None:
    if where == "step":
        text = workflow(step={"name": name})
        field = "step [0]"
    elif where == "next":
        text = workflow(step={"next": [name]})
        field = "step [0] (a).next"
    else:
        text = workflow(**{where: name})
        field = where
    message = refusal(text)
    assert field in message
    assert "lowercase letters, digits" in message


@pytest.mark.parametrize(
    "ref",
    [*BAD_NAMES[:-1], *(f"add_ten@{v}" for v in BAD_VERSIONS if v != "latest"), "sha256:abc"],
)
def test_workflow_module_refs_refuse_hostile_names_and_versions(ref: str) -> None:
    message = refusal(workflow(step={"module": ref}))
    assert "step [0] (a).module" in message and "invalid module reference" in message


@pytest.mark.parametrize("function", ["add\x00ten", "add\nten", "add ten", "é", "x" * 256, ""])
def test_workflow_function_refuses_hostile_names(function: str) -> None:
    message = refusal(workflow(step={"function": function}))
    assert "step [0] (a).function" in message and "printable ASCII" in message


def test_workflow_host_functions_refuse_hostile_names() -> None:
    message = refusal(workflow(step={"host_functions": ["send\nemail"]}))
    assert "step [0] (a).host_functions" in message and "newline" in message


def test_a_raw_nul_in_the_file_is_refused_as_not_yaml() -> None:
    text = workflow().replace("attack.in", "attack.\x00in")
    assert "\x00" in text
    assert "not valid YAML" in refusal(text)


def test_valid_names_still_parse() -> None:
    text = workflow(
        trigger=["attack.in", "attack.*.x", "attack.more.>"],
        step={
            "module": "add_ten@v1.2-rc.1",
            "publish": ["attack.out-1"],
            "emit": ["attack-out.e.*"],
        },
    )
    parsed = parse_workflow(text)
    assert parsed.trigger == ["attack.in", "attack.*.x", "attack.more.>"]
    assert parsed.steps[0].module == "add_ten@v1.2-rc.1"
