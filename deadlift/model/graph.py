"""Workflow graphs (Mermaid or Graphviz dot), with the edges that cross orgs.

A trigger that is an org's import comes from the exporting org; a publish
subject that the org exports goes on to the importing orgs. Both are drawn
when the org manifest is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deadlift.model.orgs import OrgManifest
from deadlift.model.workflow import Workflow, mermaid, subject_covers

FORMATS = ("mermaid", "dot")


@dataclass(frozen=True, slots=True)
class CrossOrg:
    """Which triggers arrive from other orgs and which publishes leave for them."""

    imported: dict[str, str] = field(default_factory=dict)  # trigger → exporting org
    exported: dict[str, list[str]] = field(default_factory=dict)  # subject → importing orgs


def cross_org(workflow: Workflow, orgs: OrgManifest | None) -> CrossOrg:
    """Find the workflow's cross-org edges in the manifest."""
    if orgs is None or workflow.org not in orgs.orgs:
        return CrossOrg()
    imported = {
        trigger: imp.org
        for trigger in workflow.trigger
        for imp in orgs.imports_of(workflow.org)
        if subject_covers(imp.local_subject, trigger) or trigger == imp.local_subject
    }
    exported: dict[str, list[str]] = {}
    for step in workflow.steps:
        for subject in step.publish:
            targets = [
                t
                for e in orgs.exports_of(workflow.org)
                if subject_covers(e.subject, subject)
                for t in e.to
            ]
            if targets:
                exported[subject] = sorted(set(targets))
    return CrossOrg(imported, exported)


def render(workflow: Workflow, fmt: str = "mermaid", orgs: OrgManifest | None = None) -> str:
    """The workflow as a Mermaid flowchart or a Graphviz digraph."""
    edges = cross_org(workflow, orgs)
    if fmt == "dot":
        return _dot(workflow, edges)
    lines = [mermaid(workflow)]
    for i, trigger in enumerate(workflow.trigger):
        if trigger in edges.imported:
            source = edges.imported[trigger]
            lines.append(f'  ORG_{_id(source)}(("org {source}")) -. "import" .-> T{i}')
    for s, step in enumerate(workflow.steps):
        for j, subject in enumerate(step.publish):
            for target in edges.exported.get(subject, []):
                lines.append(f'  S{s}P{j} -. "export" .-> ORG_{_id(target)}(("org {target}"))')
    return "\n".join(lines)


def _dot(workflow: Workflow, edges: CrossOrg) -> str:
    ids = {step.name: f"S{i}" for i, step in enumerate(workflow.steps)}
    lines = [f'digraph "{_q(workflow.key)}" {{', "  rankdir=LR;"]
    for i, trigger in enumerate(workflow.trigger):
        lines.append(f'  T{i} [shape=oval, label="{_q(trigger)}"];')
        for step in workflow.entry_steps():
            lines.append(f"  T{i} -> {ids[step.name]};")
        if trigger in edges.imported:
            source = edges.imported[trigger]
            lines.append(f'  "org:{_q(source)}" [shape=doublecircle, label="org {_q(source)}"];')
            lines.append(f'  "org:{_q(source)}" -> T{i} [style=dashed, label="import"];')
    for step in workflow.steps:
        node = ids[step.name]
        label = f"{_q(step.name)}\\n{_q(step.module)}:{_q(step.function)}"  # \\n: a line break
        lines.append(f'  {node} [shape=box, label="{label}"];')
        for target in step.next:
            lines.append(f"  {node} -> {ids[target]};")
        for j, subject in enumerate(step.publish):
            lines.append(f'  {node}P{j} [shape=parallelogram, label="{_q(subject)}"];')
            lines.append(f"  {node} -> {node}P{j} [style=dotted];")
            for target in edges.exported.get(subject, []):
                lines.append(
                    f'  "org:{_q(target)}" [shape=doublecircle, label="org {_q(target)}"];'
                )
                lines.append(f'  {node}P{j} -> "org:{_q(target)}" [style=dashed, label="export"];')
    lines.append("}")
    return "\n".join(lines)


def _q(text: str) -> str:
    """Text for inside a dot double-quoted string: the text as it is, nothing interpreted."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _id(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)
