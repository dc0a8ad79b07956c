"""Workflow manifests: parsing, validation messages, subjects, graph output."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deadlift.errors import ConfigError, DeadliftError
from deadlift.model.topology import consumer_name, step_subject
from deadlift.model.workflow import (
    Retry,
    Workflow,
    load_workflow,
    mermaid,
    minimal_subjects,
    parse_workflow,
    subject_covers,
)

SOURCE = "flows/x.yaml"

CALCULATOR = """\
name: calculator
org: acme
trigger: calc.in              # subject(s) whose messages start a run
steps:
  - name: add
    module: add_ten            # name (latest), name@version, or sha256:<hex>
    function: add_ten          # exported function; default "_main"
    next: [multiply]           # steps that receive this step's output
  - name: multiply
    module: multiply_by_five
    function: multiply_by_five
    publish: [calc.out]        # subjects that also receive the output (durably)
    timeout_ms: 500            # per call; a default always applies
    retry: {max_attempts: 3, backoff: [0.5, 2]}   # seconds between attempts
"""


def flow(steps: str, *, trigger: str = "calc.in", extra: str = "") -> str:
    """A workflow manifest with the given YAML steps block (indented list items)."""
    return f"name: wf\norg: acme\ntrigger: {trigger}\n{extra}steps:\n" + textwrap.indent(
        textwrap.dedent(steps), "  "
    )


def config_error(text: str) -> str:
    """The message of the ConfigError that parsing ``text`` raises."""
    with pytest.raises(ConfigError) as info:
        parse_workflow(text, source=SOURCE)
    message = str(info.value)
    assert message.startswith(SOURCE), message
    return message


# --- the contract's example -------------------------------------------------------------------


def test_design_minimal_calculator_example_is_valid() -> None:
    wf = parse_workflow(CALCULATOR, source=SOURCE)
    assert (wf.name, wf.org, wf.key) == ("calculator", "acme", "acme.calculator")
    assert wf.trigger == ["calc.in"]
    add, multiply = wf.steps
    assert (add.module, add.function, add.next) == ("add_ten", "add_ten", ["multiply"])
    assert multiply.publish == ["calc.out"]
    assert multiply.timeout_ms == 500
    assert multiply.retry == Retry(max_attempts=3, backoff=[0.5, 2.0])
    assert wf.step("multiply") is multiply
    assert [s.name for s in wf.entry_steps()] == ["add"]
    assert wf.event_subjects() == ["calc.in", "calc.out"]


def test_shipped_calculator_config_loads() -> None:
    path = Path(__file__).resolve().parents[2] / "config" / "workflows" / "calculator.yaml"
    assert load_workflow(path).key == "acme.calculator"


def test_defaults_function_main_and_retry() -> None:
    wf = parse_workflow(flow("- name: only\n  module: mod\n"), source=SOURCE)
    step = wf.steps[0]
    assert step.function == "_main"
    assert step.next == [] and step.publish == []
    assert step.timeout_ms is None
    assert step.retry.max_attempts >= 1
    assert step.retry == Retry()


def test_trigger_list_is_kept_and_every_trigger_is_an_event_subject() -> None:
    wf = parse_workflow(
        flow("- name: a\n  module: m\n  publish: [out.a]\n", trigger="[in.a, in.b.>]"),
        source=SOURCE,
    )
    assert wf.trigger == ["in.a", "in.b.>"]
    assert wf.event_subjects() == ["in.a", "in.b.>", "out.a"]


def test_entry_steps_are_those_no_step_feeds() -> None:
    wf = parse_workflow(
        flow(
            """\
            - {name: a, module: m, next: [c]}
            - {name: b, module: m, next: [c]}
            - {name: c, module: m}
            """
        ),
        source=SOURCE,
    )
    assert [s.name for s in wf.entry_steps()] == ["a", "b"]


def test_module_references_of_every_form_are_accepted() -> None:
    sha = "sha256:" + "ab" * 32
    wf = parse_workflow(
        flow(
            f"- {{name: a, module: mod, next: [b]}}\n- {{name: b, module: '{sha}', next: [c]}}\n"
            "- {name: c, module: mod-x@1.2.0-rc.1}\n"
        ),
        source=SOURCE,
    )
    assert [s.module for s in wf.steps] == ["mod", sha, "mod-x@1.2.0-rc.1"]


def test_workflow_is_immutable() -> None:
    wf = parse_workflow(CALCULATOR, source=SOURCE)
    with pytest.raises(ValueError):
        wf.name = "other"  # type: ignore[misc]


# --- validation errors --------------------------------------------------------------------------


def test_config_error_is_a_deadlift_error_and_a_value_error() -> None:
    assert issubclass(ConfigError, DeadliftError)
    assert issubclass(ConfigError, ValueError)


def test_unknown_next_step_names_the_step_and_lists_known_steps() -> None:
    message = config_error(
        flow("- {name: add, module: m, next: [multply]}\n- {name: mul, module: m}\n")
    )
    assert "'add'" in message and "next" in message and "'multply'" in message
    assert "add, mul" in message


def test_cycle_message_shows_the_cycle_path() -> None:
    message = config_error(
        flow(
            """\
            - {name: start, module: m, next: [a]}
            - {name: a, module: m, next: [b]}
            - {name: b, module: m, next: [a]}
            """
        )
    )
    assert "cycle" in message
    assert "a -> b -> a" in message


def test_self_loop_is_rejected() -> None:
    message = config_error(flow("- {name: a, module: m, next: [a]}\n"))
    assert "'a'" in message and "next" in message and "itself" in message


def test_duplicate_step_names_are_rejected() -> None:
    message = config_error(flow("- {name: a, module: m}\n- {name: a, module: n}\n"))
    assert "'a'" in message and "twice" in message


@pytest.mark.parametrize(
    ("subject", "why"),
    [
        ("a..b", "empty token"),
        (".a", "empty token"),
        ("a.", "empty token"),
        ("'a b'", "whitespace"),
        ('"a\\tb"', "whitespace"),
        ("a.>.b", "misplaced wildcard"),
        ("a.b*", "misplaced wildcard"),
        ("a.>>", "misplaced wildcard"),
        ("deadlift.step.x", "reserved"),
        ("deadlift.dlq.x", "reserved"),
        ("$JS.x", "reserved"),
        ("$KV.bucket.key", "reserved"),
        ("'>'", "reserved"),
        ("deadlift.>", "reserved"),
        ("deadlift.*.x", "reserved"),
        ("'*.*.>'", "reserved"),
    ],
)
def test_invalid_trigger_subject_is_rejected(subject: str, why: str) -> None:
    message = config_error(flow("- {name: a, module: m}\n", trigger=subject))
    assert "trigger" in message and why in message


@pytest.mark.parametrize(
    ("subject", "why"),
    [
        ("calc.*", "wildcards are not allowed"),
        ("calc.>", "wildcards are not allowed"),
        ("a..b", "empty token"),
        ("deadlift.step.acme.wf.a", "reserved"),
        ("$JS.API.x", "reserved"),
    ],
)
def test_invalid_publish_subject_names_step_and_field(subject: str, why: str) -> None:
    message = config_error(flow(f"- name: a\n  module: m\n  publish: ['{subject}']\n"))
    assert "step [0] (a).publish" in message and why in message


@pytest.mark.parametrize("trigger", ["calc.out", "calc.*", "calc.>", "'*.out'"])
def test_publishing_to_own_trigger_is_rejected_as_an_endless_loop(trigger: str) -> None:
    text = flow("- {name: a, module: m, publish: [calc.out]}\n", trigger=trigger)
    message = config_error(text)
    assert "calc.out" in message


def test_publish_subject_outside_own_trigger_is_fine() -> None:
    wf = parse_workflow(flow("- {name: a, module: m, publish: [calc.out]}\n", trigger="calc.in.>"))
    assert wf.steps[0].publish == ["calc.out"]


@pytest.mark.parametrize("name", ["Add", "a--b", "-a", "a-", "1a", "a b", "a.b", "x" * 65])
def test_invalid_step_name_is_rejected(name: str) -> None:
    message = config_error(flow(f"- {{name: '{name}', module: m}}\n"))
    assert "step [0]" in message and ".name" in message


@pytest.mark.parametrize("field", ["name", "org"])
def test_invalid_workflow_name_or_org_is_rejected(field: str) -> None:
    text = CALCULATOR.replace(f"{field}: ", f"{field}: Bad_", 1)
    assert re.search(rf"^\s*{field}:", config_error(text), re.MULTILINE)


def test_unknown_step_field_is_reported_with_step_name() -> None:
    message = config_error(flow("- {name: add, module: m, nxt: [b]}\n- {name: b, module: m}\n"))
    assert "step [0] (add).nxt" in message
    assert "unknown field" in message


def test_unknown_top_level_field_is_reported() -> None:
    message = config_error(CALCULATOR + "trigers: [x]\n")
    assert "trigers: unknown field" in message


@pytest.mark.parametrize("field", ["name", "org", "trigger", "steps"])
def test_missing_required_workflow_field_is_reported(field: str) -> None:
    text = "\n".join(line for line in CALCULATOR.splitlines() if not line.startswith(f"{field}:"))
    if field == "steps":
        text = "name: calculator\norg: acme\ntrigger: calc.in\n"
    message = config_error(text)
    assert f"{field}: required field is missing" in message


def test_missing_step_module_names_the_step() -> None:
    message = config_error(flow("- {name: add}\n"))
    assert "step [0] (add).module: required field is missing" in message


@pytest.mark.parametrize(
    ("retry", "field"),
    [
        ("{max_attempts: 0}", "max_attempts"),
        ("{max_attempts: -1}", "max_attempts"),
        ("{max_attempts: many}", "max_attempts"),
        ("{backoff: [-1]}", "backoff"),
        ("{tries: 3}", "tries"),
    ],
)
def test_bad_retry_names_step_and_field(retry: str, field: str) -> None:
    message = config_error(flow(f"- name: add\n  module: m\n  retry: {retry}\n"))
    assert f"step [0] (add).retry.{field}" in message


@pytest.mark.parametrize(
    "module", ["Mod", "mod@", "sha256:abc", "sha256:" + "g" * 64, "a--b", "mod@1 2", "../x"]
)
def test_bad_module_reference_names_step_and_field(module: str) -> None:
    message = config_error(flow(f"- {{name: add, module: '{module}'}}\n"))
    assert "step [0] (add).module" in message and "invalid module reference" in message


@pytest.mark.parametrize(
    ("field", "value"), [("timeout_ms", "0"), ("timeout_ms", "-5"), ("function", "''")]
)
def test_bad_step_limits_name_step_and_field(field: str, value: str) -> None:
    message = config_error(flow(f"- {{name: add, module: m, {field}: {value}}}\n"))
    assert f"step [0] (add).{field}" in message


def test_empty_trigger_and_steps_lists_are_rejected() -> None:
    message = config_error("name: wf\norg: acme\ntrigger: []\nsteps: []\n")
    assert "trigger" in message and "steps" in message


@pytest.mark.parametrize(
    "text", ["name: [unclosed", "a: b: c", "steps:\n  - x\n -y", "description: 2024-13-01"]
)
def test_not_yaml_is_a_config_error(text: str) -> None:
    assert "not valid YAML" in config_error(text)


@pytest.mark.parametrize("text", ["", "just a string", "- a\n- b\n", "42"])
def test_yaml_that_is_not_a_mapping_is_a_config_error(text: str) -> None:
    assert "mapping" in config_error(text)


def test_load_workflow_reads_a_file_and_names_it_in_errors(tmp_path: Path) -> None:
    good = tmp_path / "calc.yaml"
    good.write_text(CALCULATOR, encoding="utf-8")
    assert load_workflow(good).name == "calculator"
    assert load_workflow(str(good)).name == "calculator"

    bad = tmp_path / "bad.yaml"
    bad.write_text(flow("- {name: a, module: m, next: [zz]}\n"), encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(str(bad))):
        load_workflow(bad)


@pytest.mark.parametrize("kind", ["missing", "directory", "not-utf8"])
def test_unreadable_workflow_file_is_a_config_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "flow.yaml"
    if kind == "directory":
        path.mkdir()
    elif kind == "not-utf8":
        path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_workflow(path)


# --- subjects ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "subject", "covers"),
    [
        ("a.>", "a.b", True),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        ("a.>", "a.*", True),
        ("a.>", "a.>", True),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.*", "a", False),
        ("a.*", "a.*", True),
        ("a.*", "a.>", False),
        ("a.b", "a.*", False),
        ("a.b", "a.>", False),
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("*.b", "a.b", True),
        (">", "a.b.c", True),
        ("*", "a.b", False),
        ("a.b.c", "a.b", False),
    ],
)
def test_subject_covers(pattern: str, subject: str, covers: bool) -> None:
    assert subject_covers(pattern, subject) is covers


@pytest.mark.parametrize(
    ("subjects", "expected"),
    [
        (["a.b", "a.>", "a.b.c"], ["a.>"]),
        (["a.b", "a.*", "a.b.c"], ["a.*", "a.b.c"]),
        (["x.y", "x.y", "z"], ["x.y", "z"]),
        (["a.*", "a.>"], ["a.>"]),
        (["a.>", "a"], ["a", "a.>"]),
        ([], []),
    ],
)
def test_minimal_subjects_drops_covered_and_duplicate_subjects(
    subjects: list[str], expected: list[str]
) -> None:
    assert minimal_subjects(subjects) == expected


def nats_match(pattern: str, subject: str) -> bool:
    """Reference NATS matching of a literal subject against a pattern."""
    p, s = pattern.split("."), subject.split(".")
    if p[-1] == ">":
        return len(s) >= len(p) and all(a in ("*", b) for a, b in zip(p[:-1], s, strict=False))
    return len(p) == len(s) and all(a in ("*", b) for a, b in zip(p, s, strict=True))


def instances(pattern: str) -> list[str]:
    """Literal subjects a pattern matches, over the alphabet a, b, c ("c" never in patterns)."""
    out = [""]
    for tok in pattern.split("."):
        if tok == "*":
            choices = ["a", "b", "c"]
        elif tok == ">":
            choices = ["a", "b", "c", "c.c", "a.c"]
        else:
            choices = [tok]
        out = [f"{o}.{c}" if o else c for o in out for c in choices]
    return out


patterns = st.builds(
    lambda toks, tail: ".".join(toks + ([">"] if tail else [])),
    st.lists(st.sampled_from(["a", "b", "*"]), min_size=1, max_size=3),
    st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(pattern=patterns, subject=patterns)
def test_subject_covers_agrees_with_nats_matching(pattern: str, subject: str) -> None:
    """``pattern`` covers ``subject`` exactly when it matches every subject ``subject`` does."""
    truly_covers = all(nats_match(pattern, s) for s in instances(subject))
    assert subject_covers(pattern, subject) is truly_covers


def test_minimal_subjects_never_loses_coverage() -> None:
    subjects = ["a.b", "a.*", "a.>", "c.*.d", "c.x.d", "c.>", "e"]
    kept = minimal_subjects(subjects)
    assert kept == ["a.>", "c.>", "e"]
    assert all(any(subject_covers(k, s) for k in kept) for s in subjects)


# --- mermaid ----------------------------------------------------------------------------------


def test_mermaid_shows_trigger_steps_edges_and_publish_subjects() -> None:
    wf = parse_workflow(CALCULATOR, source=SOURCE)
    chart = mermaid(wf)
    assert chart.startswith("flowchart")
    ids = node_ids(chart)
    assert "calc.in" in ids and "calc.out" in ids
    assert "add_ten:add_ten" in chart and "multiply_by_five:multiply_by_five" in chart
    edges = set(re.findall(r"^\s*(\S+) -\.?->? (\S+)$", chart, re.MULTILINE))
    assert (ids["calc.in"], ids["add"]) in edges
    assert (ids["add"], ids["multiply"]) in edges
    assert (ids["multiply"], ids["calc.out"]) in edges
    assert (ids["calc.in"], ids["multiply"]) not in edges


def node_ids(chart: str) -> dict[str, str]:
    """Map each node's first label line (step name or subject) to its Mermaid id."""
    found = {}
    for node, label in re.findall(r'^\s*(\w+)[\[(/]+"([^"]*)"', chart, re.MULTILINE):
        found[label.split("<br/>")[0]] = node
    return found


def test_mermaid_node_ids_never_clash_with_step_names_or_keywords() -> None:
    # Steps named like other nodes' ids, or the Mermaid keyword ``end``, stay distinct nodes.
    wf = parse_workflow(
        flow(
            """\
            - {name: t0, module: m, next: [end], publish: [p.x]}
            - {name: end, module: m, next: [t0_p0]}
            - {name: t0_p0, module: m}
            """,
            trigger="in.x",
        )
    )
    chart = mermaid(wf)
    ids = node_ids(chart)
    assert len(set(ids.values())) == len(ids) == 5  # in.x, t0, end, t0_p0, p.x
    assert all(node != "end" for node in ids.values())


def test_mermaid_escapes_quotes_in_labels() -> None:
    wf = parse_workflow(flow("""- {name: a, module: m, function: 'say"hi'}\n"""))
    line = next(line for line in mermaid(wf).splitlines() if "say" in line)
    assert line.count('"') == 2


# --- retry, names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "delay"), [(1, 0.5), (2, 2.0), (3, 5.0), (4, 5.0), (100, 5.0), (0, 0.5)]
)
def test_retry_delay_uses_backoff_and_repeats_the_last_value(attempt: int, delay: float) -> None:
    assert Retry(max_attempts=5, backoff=[0.5, 2, 5]).delay(attempt) == delay


def test_retry_without_backoff_waits_zero() -> None:
    assert Retry(backoff=[]).delay(3) == 0.0


def test_step_subject_and_consumer_name_are_unique_per_step() -> None:
    triples = [
        ("acme", "calc", "add"),
        ("acme", "calc", "add-x"),
        ("acme", "calc-add", "x"),
        ("acme-calc", "add", "x"),
        ("acme", "calc_add", "x"),
        ("stripe", "calc", "add"),
        ("a", "b-c", "d"),
        ("a-b", "c", "d"),
    ]
    subjects = {step_subject(*t) for t in triples}
    consumers = {consumer_name(*t) for t in triples}
    assert len(subjects) == len(consumers) == len(triples)
    assert step_subject("acme", "calc", "add").startswith("deadlift.step.")


name_strategy = st.from_regex(r"[a-z][a-z0-9_]{0,3}(-[a-z0-9_]{1,3}){0,2}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(
    a=st.tuples(name_strategy, name_strategy, name_strategy),
    b=st.tuples(name_strategy, name_strategy, name_strategy),
)
def test_distinct_steps_never_share_a_subject_or_consumer(
    a: tuple[str, str, str], b: tuple[str, str, str]
) -> None:
    if a != b:
        assert step_subject(*a) != step_subject(*b)
        assert consumer_name(*a) != consumer_name(*b)
    consumer = consumer_name(*a)
    assert not any(c in consumer for c in ".*> ")


def test_step_subjects_are_valid_literal_subjects_for_every_step() -> None:
    wf: Workflow = parse_workflow(CALCULATOR, source=SOURCE)
    for step in wf.steps:
        subject = step_subject(wf.org, wf.name, step.name)
        assert "*" not in subject and ">" not in subject and " " not in subject
        assert subject.split(".")[-1] == step.name
