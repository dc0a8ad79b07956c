"""Workflow manifests: YAML → validated models, and the subjects they imply."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from deadlift.errors import ConfigError
from deadlift.model import names
from deadlift.model.topology import INBOX_PREFIX, RESERVED_PATTERNS, RESERVED_PREFIXES

# The rules live in deadlift.model.names (one validation for every entry point).
NAME_PATTERN = names.NAME_PATTERN


def _name(value: str) -> str:
    return names.check_name(value, field="")


def _is_name(value: str) -> bool:
    try:
        names.check_name(value)
    except ConfigError:
        return False
    return True


def _function(value: str) -> str:
    return names.check_token(value, field="", max_length=255)


def _host_function(value: str) -> str:
    return names.check_token(value, field="", max_length=128)


Name = Annotated[str, AfterValidator(_name)]


def check_subject(subject: str, *, wildcards: bool, field: str = "") -> str:
    """Validate a subject a workflow uses; return it unchanged.

    The syntax is :func:`deadlift.names.check_subject`'s; on top of it, subjects
    Deadlift or NATS use internally (``deadlift.step.…``, ``deadlift.dlq.…``,
    ``$…``, ``_INBOX.…``, or all wildcards such as ``*.*``) are refused.

    Raises:
        ConfigError: (a ValueError) saying why.
    """
    names.check_subject(subject, field=field, wildcards=wildcards)
    prefix = f"{field}: " if field else ""
    if (
        subject.startswith(RESERVED_PREFIXES)
        or subject == INBOX_PREFIX
        or any(subjects_overlap(subject, reserved) for reserved in RESERVED_PATTERNS)
    ):
        raise ConfigError(f"{prefix}subject {subject!r} is reserved for Deadlift or NATS internals")
    tokens = subject.split(".")
    if len(tokens) > 1 and all(t in ("*", ">") for t in tokens):
        # ``*.*`` matches every reply inbox (``_INBOX.<random>``) and ``$`` subject of
        # its length: a stream capturing it would store, and feed on, NATS's own traffic.
        raise ConfigError(
            f"{prefix}subject {subject!r} is all wildcards and would capture NATS internals "
            f"({INBOX_PREFIX}.… replies, $… subjects); start it with a literal token"
        )
    return subject


def subjects_overlap(a: str, b: str) -> bool:
    """Whether some subject matches both ``a`` and ``b`` (either may hold wildcards)."""
    x, y = a.split("."), b.split(".")
    for s, t in zip(x, y, strict=False):
        if s == ">" or t == ">":
            return True
        if s != t and "*" not in (s, t):
            return False
    return len(x) == len(y)


def subject_covers(pattern: str, subject: str) -> bool:
    """Whether ``pattern`` (may hold wildcards) matches every subject ``subject`` matches."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or s[i] == ">":
            # ``>`` matches one or more tokens: only ``>`` covers it.
            return False
        if token != "*" and token != s[i]:
            # A literal covers only itself (not ``*``).
            return False
    return len(p) == len(s)


def minimal_subjects(subjects: Iterable[str]) -> list[str]:
    """Drop subjects covered by another one (JetStream refuses overlapping stream subjects).

    Only a pattern (``*``, ``>``) covers another subject, so each subject is checked
    against the patterns alone: linear in the literals, which thousands of
    workflows have many of (a pairwise check was the worker start's hot spot).
    """
    unique = sorted(set(subjects))
    patterns = [s for s in unique if {"*", ">"} & set(s.split("."))]
    return [s for s in unique if not any(o != s and subject_covers(o, s) for o in patterns)]


class Retry(BaseModel):
    """How often a failing step is tried, and how long to wait between attempts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(3, ge=1, le=100)
    backoff: list[Annotated[float, Field(ge=0, le=3600)]] = Field(default_factory=lambda: [1.0])

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if not self.backoff:
            return 0.0
        return self.backoff[min(max(attempt, 1), len(self.backoff)) - 1]


class Loop(BaseModel):
    """A bounded loop: the step may close a cycle of publish/emit → trigger edges.

    Each event carries its run's hop count (one per step output or emitted event);
    the step runs an event only while that count is at most ``max_hops``, then
    dead-letters it (kind ``hops``), so every trip round the cycle is bounded.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_hops: int = Field(ge=1, le=100_000)


class Step(BaseModel):
    """One step: a function of a module, and where its output goes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    module: str
    function: Annotated[str, AfterValidator(_function)] = "_main"
    next: list[Name] = Field(default_factory=list)
    publish: list[str] = Field(default_factory=list)
    host_functions: list[Annotated[str, AfterValidator(_host_function)]] = Field(
        default_factory=list
    )
    timeout_ms: int | None = Field(None, gt=0, le=3_600_000)
    max_memory_pages: int | None = Field(None, gt=0, le=65536)
    concurrency: int | None = Field(None, gt=0, le=1024)
    retry: Retry = Field(default_factory=Retry)
    config: dict[str, str] = Field(default_factory=dict)
    emit: list[str] = Field(default_factory=list)
    allowed_hosts: list[str] = Field(default_factory=list)
    loop: Loop | None = None  # declares that this step closes a bounded loop
    # Filled in by `workflow apply`: the exact binary this step runs.
    module_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    codec: str | None = None

    @field_validator("module")
    @classmethod
    def _module_ref(cls, value: str) -> str:
        return names.check_module_ref(value, field="")

    @field_validator("publish")
    @classmethod
    def _publish_subjects(cls, value: list[str]) -> list[str]:
        return [check_subject(s, wildcards=False) for s in value]

    @field_validator("emit")
    @classmethod
    def _emit_subjects(cls, value: list[str]) -> list[str]:
        return [check_subject(s, wildcards=True) for s in value]


class TriggerStart(BaseModel):
    """Where a trigger's consumer delivers from: a sequence in one life of its stream."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: PositiveInt
    # The stream's creation time: a stream deleted and made again numbers from 1, and
    # every event in it came after the start.
    stream_created: datetime | None = None

    def of_stream(self, created: datetime | None) -> TriggerStart:
        """This start in the stream made at ``created``: the same, or 1 in a stream made
        since (a microsecond of slack: what a JSON round trip may round)."""
        if created is None or self.stream_created is None:
            return self
        if abs((created - self.stream_created).total_seconds()) < 1e-3:
            return self
        return TriggerStart(seq=1, stream_created=created)


class Workflow(BaseModel):
    """A named graph of steps, started by messages on its trigger subjects."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    org: Name
    description: str = ""
    trigger: list[str] = Field(min_length=1)
    steps: list[Step] = Field(min_length=1)
    # Filled in by `workflow apply` from the org manifest: trigger subjects that
    # arrive through an import, each mapped to the org that exports them.
    imports: dict[str, Name] = Field(default_factory=dict)
    # Filled in by `workflow apply`: per trigger consumer, where it delivers from once
    # made (the stream's next sequence at the apply that first had it). It is made by
    # the first worker to find an event there, not by the apply.
    starts: dict[str, TriggerStart] = Field(default_factory=dict)

    @field_validator("trigger", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("trigger")
    @classmethod
    def _trigger_subjects(cls, value: list[str]) -> list[str]:
        return [check_subject(s, wildcards=True) for s in value]

    @model_validator(mode="after")
    def _imports_are_triggers(self) -> Workflow:
        stray = sorted(set(self.imports) - set(self.trigger))
        if stray:
            raise ValueError(f"imports: {', '.join(stray)} is not a trigger of the workflow")
        return self

    @property
    def key(self) -> str:
        """``org.name``: unique across the registry."""
        return f"{self.org}.{self.name}"

    def step(self, name: str) -> Step:
        """The step called ``name``."""
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    def entry_steps(self) -> list[Step]:
        """Steps that receive the trigger: those no other step lists in ``next``."""
        targets = {n for s in self.steps for n in s.next}
        return [s for s in self.steps if s.name not in targets]

    def imported_triggers(self) -> dict[str, list[str]]:
        """Trigger subjects that arrive through imports, per exporting org."""
        found: dict[str, list[str]] = {}
        for subject, exporter in self.imports.items():
            found.setdefault(exporter, []).append(subject)
        return found

    def event_subjects(self) -> list[str]:
        """The org's own trigger and publish subjects: captured by the events stream."""
        return [
            *(t for t in self.trigger if t not in self.imports),
            *(s for step in self.steps for s in step.publish),
            *(s for step in self.steps for s in step.emit),
        ]


def parse_workflow(text: str, *, source: str = "<workflow>") -> Workflow:
    """Parse and validate a workflow manifest.

    Raises:
        ConfigError: naming ``source``, the step and the field at fault.
    """
    try:
        raw = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        # ValueError: e.g. a date-like scalar that is no date (2024-13-01).
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: a workflow must be a YAML mapping with name, org, trigger, steps"
        )
    try:
        workflow = Workflow.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(source, raw, exc)) from None
    _check_graph(workflow, source)
    return workflow


def load_workflow(path: str | Path) -> Workflow:
    """Read and validate a workflow file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read workflow file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: workflow file is not UTF-8 text: {exc}") from exc
    return parse_workflow(text, source=str(path))


def _describe(source: str, raw: dict[str, Any], exc: ValidationError) -> str:
    lines = [f"{source}: invalid workflow"]
    for error in exc.errors():
        loc = list(error["loc"])
        where = _location(raw, loc)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see the README for the workflow fields)"
        elif error["type"] == "missing":
            message = "required field is missing"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def _location(raw: dict[str, Any], loc: list[Any]) -> str:
    parts: list[str] = []
    node: Any = raw
    for i, item in enumerate(loc):
        if isinstance(item, int):
            label = f"[{item}]"
            if i > 0 and loc[i - 1] == "steps" and isinstance(node, list) and item < len(node):
                name = node[item].get("name") if isinstance(node[item], dict) else None
                if name is not None and not (isinstance(name, str) and _is_name(name)):
                    name = names.shown(name)  # a hostile name stays on one, short line
                label = f"[{item}] ({name})" if name else label
            parts.append(label)
        else:
            parts.append(("." if parts else "") + str(item))
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            node = None
    where = "".join(parts)
    return where.replace("steps[", "step [", 1) if where.startswith("steps[") else where


def _check_graph(workflow: Workflow, source: str) -> None:
    names = [s.name for s in workflow.steps]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(
                f"{source}: step {name!r}: name: defined twice; step names must be unique"
            )
        seen.add(name)
    for step in workflow.steps:
        for target in step.next:
            if target not in seen:
                raise ConfigError(
                    f"{source}: step {step.name!r}: next: unknown step {target!r} "
                    f"(steps are: {', '.join(names)})"
                )
            if target == step.name:
                raise ConfigError(f"{source}: step {step.name!r}: next: a step cannot feed itself")
    cycle = _find_cycle(workflow)
    if cycle:
        raise ConfigError(
            f"{source}: steps form a cycle: {' -> '.join(cycle)}; a workflow must be acyclic"
        )
    _check_self_trigger(workflow, source)


def _check_self_trigger(workflow: Workflow, source: str) -> None:
    for step in workflow.steps:
        if step.loop is not None:
            continue  # a declared, bounded loop
        for subject in step.publish:
            for trigger in workflow.trigger:
                if subject_covers(trigger, subject):
                    raise ConfigError(
                        f"{source}: step {step.name!r}: publish: {subject!r} matches the "
                        f"workflow's own trigger {trigger!r}; every output would start "
                        "the workflow again, forever (or bound it: loop: {max_hops: N})"
                    )
        for pattern in step.emit:
            for trigger in workflow.trigger:
                if subjects_overlap(trigger, pattern):
                    raise ConfigError(
                        f"{source}: step {step.name!r}: emit: {pattern!r} overlaps the "
                        f"workflow's own trigger {trigger!r}; an emitted event could start "
                        "the workflow again, forever (or bound it: loop: {max_hops: N})"
                    )


def _find_cycle(workflow: Workflow) -> list[str] | None:
    graph = {s.name: s.next for s in workflow.steps}
    found = find_cycle(graph)
    return [*found, found[0]] if found else None


N = TypeVar("N")
_DONE: Any = object()  # the end of a node's successors


def find_cycle(graph: Mapping[N, Iterable[N]]) -> list[N] | None:
    """A cycle of ``graph`` (node → successors) as its nodes in order, or None.

    Iterative (a workflow may have thousands of steps: no recursion limit).
    Successors missing from ``graph`` are nodes without successors.
    """
    state: dict[N, int] = {}  # 1 = on the current path, 2 = done
    for root in graph:
        if root in state:
            continue
        state[root] = 1
        path: list[N] = [root]
        stack = [iter(graph[root])]
        while stack:
            target = next(stack[-1], _DONE)
            if target is _DONE:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(target) == 1:
                return path[path.index(target) :]
            elif target not in state:
                state[target] = 1
                path.append(target)
                stack.append(iter(graph.get(target, ())))
    return None


def check_org_graph(applied: list[tuple[Workflow, str]], stored: Iterable[Workflow]) -> None:
    """Refuse workflows whose events would feed each other forever (an event storm).

    The graph is the org's whole: the workflows ``applied`` (with their files)
    plus those ``stored`` that they do not replace. Its nodes are steps; its edges
    are ``next``, and each ``publish`` subject or ``emit`` pattern to the entry
    steps of every workflow it can trigger. A cycle is refused unless one of its
    steps declares ``loop`` (its hop bound stops every trip round the cycle).

    Raises:
        ConfigError: naming the workflows, steps and subjects of the cycle.
    """
    flows = {w.key: w for w in stored}
    flows.update({w.key: w for w, _ in applied})
    sources = {w.key: src for w, src in applied}
    graph: dict[tuple[str, str], list[tuple[str, str]]] = {}
    how: dict[tuple[tuple[str, str], tuple[str, str]], str] = {}
    bounded = {(w.key, s.name) for w in flows.values() for s in w.steps if s.loop}
    entries = {key: [s.name for s in w.entry_steps()] for key, w in flows.items()}

    def edge(a: tuple[str, str], b: tuple[str, str], label: str) -> None:
        if a not in bounded and b not in bounded:
            graph.setdefault(a, []).append(b)
            how.setdefault((a, b), label)

    for w in flows.values():
        for step in w.steps:
            node = (w.key, step.name)
            for target in step.next:
                edge(node, (w.key, target), f"next: {target}")
            outputs: list[tuple[str, str, Callable[[str, str], bool]]] = [
                ("publishes", s, subject_covers) for s in step.publish
            ]
            outputs += [("emits", s, subjects_overlap) for s in step.emit]
            for verb, subject, reaches in outputs:
                for other in flows.values():
                    for trigger in other.trigger:
                        if trigger not in other.imports and reaches(trigger, subject):
                            label = f"{verb} {subject}, trigger {trigger} of {other.key}"
                            for entry in entries[other.key]:
                                edge(node, (other.key, entry), label)
    cycle = find_cycle(graph)
    if cycle is None:
        return
    lines = [
        f"  {a[0]} step {a[1]!r} {how[(a, b)]} (step {b[1]!r})"
        for a, b in zip(cycle, [*cycle[1:], cycle[0]], strict=True)
    ]
    files = sorted({sources[key] for key, _ in cycle if key in sources})
    where = ", ".join(files) or "stored workflows"
    raise ConfigError(
        f"{where}: workflows {', '.join(sorted({key for key, _ in cycle}))} form a cycle; "
        "one event would run round it forever (an event storm):\n"
        + "\n".join(lines)
        + "\nchange a publish, emit or trigger subject to break it, or bound it: "
        "declare loop: {max_hops: N} on one of these steps"
    )


def mermaid(workflow: Workflow) -> str:
    """The workflow as a Mermaid flowchart.

    Node ids are positional (``T0``, ``S0``, ``S0P0``) so no step name can clash
    with another node or a Mermaid keyword such as ``end``; names go in labels.
    """
    ids = {step.name: f"S{i}" for i, step in enumerate(workflow.steps)}
    lines = ["flowchart LR"]
    for i, trigger in enumerate(workflow.trigger):
        lines.append(f'  T{i}(["{_label(trigger)}"])')
        for step in workflow.entry_steps():
            lines.append(f"  T{i} --> {ids[step.name]}")
    for step in workflow.steps:
        node = ids[step.name]
        label = _label(f"{step.name}<br/>{step.module}:{step.function}")
        lines.append(f'  {node}["{label}"]')
        for target in step.next:
            lines.append(f"  {node} --> {ids[target]}")
        for j, subject in enumerate(step.publish):
            lines.append(f'  {node}P{j}[/"{_label(subject)}"/]')
            lines.append(f"  {node} -.-> {node}P{j}")
    return "\n".join(lines)


def _label(text: str) -> str:
    return text.replace('"', "#quot;")
