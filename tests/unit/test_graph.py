"""Workflow graphs (Mermaid and Graphviz dot) with their cross-org edges; no server needed.

Both outputs are parsed back into nodes and edges, so the checks are about the
graph a reader sees, not about incidental formatting.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deadlift.model.graph import CrossOrg, cross_org, render
from deadlift.model.orgs import OrgManifest, load_orgs
from deadlift.model.workflow import Workflow, load_workflow

ROOT = Path(__file__).resolve().parents[2]
FLOWS = ROOT / "config" / "workflows"
ORGS = load_orgs(ROOT / "config" / "orgs.yaml")
CALCULATOR = load_workflow(FLOWS / "calculator.yaml")
CHARGES = load_workflow(FLOWS / "stripe-charges.yaml")
LOYALTY = load_workflow(FLOWS / "acme-loyalty.yaml")
ALL = [CALCULATOR, CHARGES, LOYALTY]


@dataclass
class Graph:
    """Nodes (id → label) and edges (source, target, edge label) read back from a rendering."""

    nodes: dict[str, str] = field(default_factory=dict)
    edges: list[tuple[str, str, str]] = field(default_factory=list)

    def node(self, label: str) -> str:
        """The id of the one node with this label."""
        ids = [i for i, text in self.nodes.items() if text == label]
        assert len(ids) == 1, f"expected one node labelled {label!r}, found {ids}: {self.nodes}"
        return ids[0]

    def labelled(self, source: str, target: str) -> list[str]:
        """Labels of the edges from the node labelled ``source`` to the one labelled ``target``."""
        s, t = self.node(source), self.node(target)
        return [label for a, b, label in self.edges if (a, b) == (s, t)]

    def org_nodes(self) -> set[str]:
        return {label for label in self.nodes.values() if label.startswith("org ")}


# -- Mermaid -------------------------------------------------------------------

_MERMAID_SHAPES = {"([": "])", "((": "))", "[/": "/]", "[": "]"}
_MERMAID_NODE = re.compile(
    r'(?P<id>[A-Za-z_]\w*)(?P<open>\(\[|\(\(|\[/|\[)"(?P<label>[^"]*)"(?P<close>\]\)|\)\)|/\]|\])'
)
_MERMAID_EDGE = re.compile(r'^(\w+) (?:-->|-\.->|-\. "(?P<text>[^"]*)" \.->) (\w+)$')


def parse_mermaid(text: str) -> Graph:
    lines = text.splitlines()
    assert lines[0] == "flowchart LR"
    graph = Graph()
    for line in lines[1:]:
        assert line.startswith("  ") and not line.startswith("   "), line

        def declare(match: re.Match[str], line: str = line) -> str:
            assert _MERMAID_SHAPES[match["open"]] == match["close"], line
            node, label = match["id"], match["label"].replace("#quot;", '"')
            assert graph.nodes.setdefault(node, label) == label, f"{node} relabelled: {line}"
            return node

        rest = _MERMAID_NODE.sub(declare, line.strip())
        if rest in graph.nodes:
            continue  # a node declaration alone
        edge = _MERMAID_EDGE.match(rest)
        assert edge, f"not a node or an edge: {line!r}"
        graph.edges.append((edge[1], edge[3], edge["text"] or ""))
    for source, target, _ in graph.edges:
        assert source in graph.nodes and target in graph.nodes, (source, target)
    return graph


# -- dot -------------------------------------------------------------------------

_DOT_STRING = r'"(?:[^"\\]|\\.)*"'
_DOT_ID = rf"(?:[A-Za-z_]\w*|{_DOT_STRING})"
_DOT_ATTRS = rf"\[(?P<attrs>\w+=(?:{_DOT_STRING}|\w+)(?:, \w+=(?:{_DOT_STRING}|\w+))*)\]"
_DOT_NODE = re.compile(rf"^(?P<id>{_DOT_ID}) {_DOT_ATTRS};$")
_DOT_EDGE = re.compile(rf"^(?P<a>{_DOT_ID}) -> (?P<b>{_DOT_ID})(?: {_DOT_ATTRS})?;$")
_DOT_ATTR = re.compile(rf"(\w+)=({_DOT_STRING}|\w+)")


def dot_unescape(text: str) -> str:
    """A dot string's text: quotes stripped, ``\\"`` and ``\\\\`` undone, ``\\n`` a newline."""
    if not text.startswith('"'):
        return text
    out, chars = [], iter(text[1:-1])
    for c in chars:
        if c == "\\":
            nxt = next(chars)
            out.append({"n": "\n", '"': '"', "\\": "\\"}.get(nxt, "\\" + nxt))
        else:
            out.append(c)
    return "".join(out)


def check_dot_structure(text: str) -> None:
    """Braces balance outside strings; every statement line ends with ';'."""
    depth = 0
    for c in re.sub(_DOT_STRING, '""', text):
        depth += {"{": 1, "}": -1}.get(c, 0)
        assert depth >= 0
    assert depth == 0
    lines = text.splitlines()
    assert re.fullmatch(rf"digraph {_DOT_STRING} \{{", lines[0]), lines[0]
    assert lines[-1] == "}"
    for line in lines[1:-1]:
        assert line.endswith(";"), f"statement without ';': {line!r}"
    assert sum("->" in line for line in lines) > 0


def parse_dot(text: str) -> Graph:
    check_dot_structure(text)
    graph = Graph()
    for line in text.splitlines()[1:-1]:
        statement = line.strip()
        if statement == "rankdir=LR;":
            continue
        if edge := _DOT_EDGE.match(statement):
            attrs = dict(_DOT_ATTR.findall(edge["attrs"] or ""))
            label = dot_unescape(attrs.get("label", ""))
            graph.edges.append((dot_unescape(edge["a"]), dot_unescape(edge["b"]), label))
            continue
        node = _DOT_NODE.match(statement)
        assert node, f"not a node or an edge statement: {line!r}"
        attrs = dict(_DOT_ATTR.findall(node["attrs"]))
        label = dot_unescape(attrs["label"])
        name = dot_unescape(node["id"])
        assert graph.nodes.setdefault(name, label) == label, f"{name} relabelled: {line}"
    for source, target, _ in graph.edges:
        assert source in graph.nodes and target in graph.nodes, (source, target)
    return graph


def parse(workflow: Workflow, fmt: str, orgs: OrgManifest | None = ORGS) -> Graph:
    text = render(workflow, fmt, orgs)
    return parse_mermaid(text) if fmt == "mermaid" else parse_dot(text)


def step_label(workflow: Workflow, name: str, fmt: str) -> str:
    step = workflow.step(name)
    separator = "<br/>" if fmt == "mermaid" else "\n"
    return f"{step.name}{separator}{step.module}:{step.function}"


FORMATS = pytest.mark.parametrize("fmt", ["mermaid", "dot"])


# -- every step, edge, trigger and publish -----------------------------------------


@FORMATS
@pytest.mark.parametrize("workflow", ALL, ids=lambda w: w.key)
@pytest.mark.parametrize("manifest", [ORGS, None], ids=["orgs", "no-orgs"])
def test_every_step_trigger_next_and_publish_is_drawn(
    workflow: Workflow, fmt: str, manifest: OrgManifest | None
) -> None:
    graph = parse(workflow, fmt, manifest)
    expected: set[tuple[str, str, str]] = set()
    for trigger in workflow.trigger:
        for entry in workflow.entry_steps():
            expected.add((trigger, step_label(workflow, entry.name, fmt), ""))
    for step in workflow.steps:
        label = step_label(workflow, step.name, fmt)
        for target in step.next:
            expected.add((label, step_label(workflow, target, fmt), ""))
        for subject in step.publish:
            expected.add((label, subject, ""))
    drawn = {(graph.nodes[a], graph.nodes[b], text) for a, b, text in graph.edges}
    cross = {e for e in drawn if e[2] in ("import", "export")}
    assert drawn - cross == expected
    # One node per step, trigger and publish subject (plus any org nodes).
    plain = [label for label in graph.nodes.values() if not label.startswith("org ")]
    publishes = [s for step in workflow.steps for s in step.publish]
    assert len(plain) == len(workflow.steps) + len(workflow.trigger) + len(publishes)
    if manifest is None:
        assert not graph.org_nodes() and not cross


@FORMATS
def test_stripe_publish_is_exported_to_acme(fmt: str) -> None:
    graph = parse(CHARGES, fmt)
    assert graph.org_nodes() == {"org acme"}
    assert graph.labelled("stripe.out.acme.discounts", "org acme") == ["export"]
    assert graph.labelled(step_label(CHARGES, "notice", fmt), "stripe.out.acme.discounts") == [""]
    assert not [e for e in graph.edges if e[2] == "import"]


@FORMATS
def test_acme_trigger_is_imported_from_stripe(fmt: str) -> None:
    graph = parse(LOYALTY, fmt)
    assert graph.org_nodes() == {"org stripe"}
    assert graph.labelled("org stripe", "acme.in.stripe.discounts") == ["import"]
    # Acme's own publish leaves for nobody.
    assert not [e for e in graph.edges if e[2] == "export"]


@FORMATS
def test_calculator_has_no_cross_org_edges(fmt: str) -> None:
    graph = parse(CALCULATOR, fmt)
    assert not graph.org_nodes()
    assert {label for _, _, label in graph.edges} == {""}


@FORMATS
@pytest.mark.parametrize("workflow", [CHARGES, LOYALTY], ids=lambda w: w.key)
def test_without_a_manifest_there_are_no_org_nodes(workflow: Workflow, fmt: str) -> None:
    text = render(workflow, fmt)
    assert "org " not in text and "import" not in text and "export" not in text
    assert not parse(workflow, fmt, None).org_nodes()


def test_cross_org_reads_the_manifest() -> None:
    assert cross_org(CALCULATOR, ORGS) == CrossOrg()
    assert cross_org(CHARGES, ORGS) == CrossOrg({}, {"stripe.out.acme.discounts": ["acme"]})
    assert cross_org(LOYALTY, ORGS) == CrossOrg({"acme.in.stripe.discounts": "stripe"}, {})
    assert cross_org(LOYALTY, None) == CrossOrg()
    stranger = LOYALTY.model_copy(update={"org": "initech"})  # not in the manifest
    assert cross_org(stranger, ORGS) == CrossOrg()


@FORMATS
def test_only_the_imported_trigger_gets_an_import_edge(fmt: str) -> None:
    workflow = LOYALTY.model_copy(update={"trigger": ["calc.manual", "acme.in.stripe.discounts"]})
    graph = parse(workflow, fmt)
    assert graph.labelled("org stripe", "acme.in.stripe.discounts") == ["import"]
    assert [e for e in graph.edges if graph.nodes[e[1]] == "calc.manual"] == []
    aggregate = step_label(workflow, "aggregate", fmt)
    assert graph.labelled("calc.manual", aggregate) == [""]
    assert graph.labelled("acme.in.stripe.discounts", aggregate) == [""]


# -- escaping --------------------------------------------------------------------

ODD_FUNCTION = 'say"hi"\\nC:\\dir\\{x};a->b'  # quotes, a literal backslash-n, braces
ODD = Workflow.model_validate(
    {
        "name": "odd",
        "org": "acme",
        "trigger": ['acme."quoted"', "acme.back\\slash"],
        "steps": [
            {"name": "first", "module": "echo@1.0", "function": ODD_FUNCTION, "next": ["end"]},
            {"name": "end", "module": "echo", "function": "x", "publish": ['acme.out."o"']},
        ],
    }
)


@FORMATS
def test_quotes_and_backslashes_in_labels_are_escaped(fmt: str) -> None:
    graph = parse(ODD, fmt)  # parses: no label ends early
    first = step_label(ODD, "first", fmt)
    assert first.endswith(ODD_FUNCTION)
    assert graph.labelled('acme."quoted"', first) == [""]
    assert graph.labelled("acme.back\\slash", first) == [""]
    assert graph.labelled(first, step_label(ODD, "end", fmt)) == [""]
    assert graph.labelled(step_label(ODD, "end", fmt), 'acme.out."o"') == [""]


def test_mermaid_labels_hold_no_raw_quote() -> None:
    text = render(ODD, "mermaid")
    assert "#quot;hi#quot;" in text
    for label in re.findall(r'"([^"]*)"', text):
        assert "#quot;" in label or '"' not in label


def test_dot_output_is_structurally_sound() -> None:
    for workflow in [*ALL, ODD]:
        check_dot_structure(render(workflow, "dot", ORGS))


@pytest.mark.parametrize("workflow", [*ALL, ODD], ids=lambda w: w.key)
def test_graphviz_accepts_the_dot_output(workflow: Workflow) -> None:
    """Graphviz's own parser, when ``dot`` is installed (the ``graphviz`` Python package
    needs it too); without it the structural checks stand on their own."""
    text = render(workflow, "dot", ORGS)
    check_dot_structure(text)
    dot = shutil.which("dot")
    if dot is None:
        return
    result = subprocess.run([dot, "-Tcanon"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
