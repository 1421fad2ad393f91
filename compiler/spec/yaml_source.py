"""YAML with a line and column on every node, and duplicate keys rejected.

PyYAML's composer gives nodes with marks; we turn them into three small node types so that
nothing after this module sees PyYAML, and every value can point back at its place in the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import yaml

from ..diagnostics import Diagnostics, SourceSpan


@dataclass(frozen=True)
class YScalar:
    value: str
    span: SourceSpan
    quoted: bool          # written in quotes: always a string, never a number or a bool
    style_offset: int     # columns between the mark and the first character of the value

    def text_span(self, start: int, length: int) -> SourceSpan:
        """The span of `length` characters at `start` inside the value (single-line values)."""
        return self.span.shifted(self.style_offset + start, length)


@dataclass(frozen=True)
class YSeq:
    items: tuple["YNode", ...]
    span: SourceSpan


@dataclass(frozen=True)
class YMap:
    entries: tuple[tuple[YScalar, "YNode"], ...]
    span: SourceSpan

    def get(self, key: str) -> "YNode | None":
        for k, v in self.entries:
            if k.value == key:
                return v
        return None

    def keys(self) -> list[str]:
        return [k.value for k, _ in self.entries]


YNode = Union[YScalar, YSeq, YMap]


# What a spec may be: specs are a few kilobytes and a handful of levels deep; the bounds keep a
# hostile file from costing minutes or the interpreter's stack.
MAX_SPEC_BYTES = 256 * 1024
MAX_DEPTH = 24


def _span(file: str, start: yaml.Mark, end: yaml.Mark | None = None) -> SourceSpan:
    end = end or start
    return SourceSpan(file, start.line + 1, start.column + 1, end.line + 1, end.column + 1)


def text_position(text: str, index: int) -> tuple[int, int]:
    """The 1-based line and column of character `index` of `text`."""
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


class _Collection:
    """A mapping or sequence being composed: its items so far, and what to do with the next one."""

    def __init__(self, start: yaml.Event, quiet: bool):
        self.start = start
        self.is_map = isinstance(start, yaml.MappingStartEvent)
        self.items: list = []
        self.key: YScalar | None = None   # mappings: the key whose value comes next
        self.skip_value = False           # mappings: the next value belongs to a refused key
        self.seen: dict[str, SourceSpan] = {}
        self.quiet = quiet                # inside a refused key or value: report nothing more


class _Composer:
    """Build Y-nodes from PyYAML's event stream with an explicit stack: no recursion, so depth is
    bounded by MAX_DEPTH rather than by Python's stack, and aliases are refused before they expand
    (one alias refers to a whole subtree; nested ones grow exponentially: the 'billion laughs')."""

    def __init__(self, file: str, diags: Diagnostics):
        self.file = file
        self.d = diags
        self.stack: list[_Collection] = []
        self.root: YNode | None = None
        self.documents = 0

    def quiet(self) -> bool:
        return bool(self.stack) and (self.stack[-1].quiet or (self.stack[-1].is_map and self.stack[-1].skip_value))

    def error(self, code: str, message: str, span: SourceSpan, *hints: str) -> None:
        if not self.quiet():
            self.d.error(code, message, span, *hints)

    def feed(self, event: yaml.Event) -> bool:
        """Take one event; False when composing must stop (the error is reported)."""
        if isinstance(event, yaml.DocumentStartEvent):
            self.documents += 1
            if self.documents > 1:
                self.d.error("E101", "YAML syntax: a spec is one YAML document, this file has more",
                             _span(self.file, event.start_mark), "remove the '---' line")
                return False
        elif isinstance(event, yaml.AliasEvent):
            self.d.error("E116", f"YAML alias '*{event.anchor}' is not accepted in a spec",
                         _span(self.file, event.start_mark, event.end_mark),
                         "write the value out; probec refuses anchors and aliases")
            return False
        elif isinstance(event, (yaml.ScalarEvent, yaml.MappingStartEvent, yaml.SequenceStartEvent)) \
                and event.anchor is not None:
            self.d.error("E116", f"YAML anchor '&{event.anchor}' is not accepted in a spec",
                         _span(self.file, event.start_mark),
                         "write the value out; probec refuses anchors and aliases")
            return False
        if isinstance(event, yaml.ScalarEvent):
            quoted = event.style in ("'", '"')
            self.add(YScalar(str(event.value), _span(self.file, event.start_mark, event.end_mark),
                             quoted, 1 if quoted else 0))
        elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if len(self.stack) >= MAX_DEPTH:
                self.d.error("E116", f"the spec nests deeper than {MAX_DEPTH} levels",
                             _span(self.file, event.start_mark), "a spec needs about six")
                return False
            self.stack.append(_Collection(event, self.quiet()))
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            top = self.stack.pop()
            span = _span(self.file, top.start.start_mark, event.end_mark)
            self.add(YMap(tuple(top.items), span) if top.is_map else YSeq(tuple(top.items), span))
        return True

    def add(self, node: YNode) -> None:
        if not self.stack:
            self.root = node
            return
        top = self.stack[-1]
        if not top.is_map:
            top.items.append(node)
        elif top.skip_value:
            top.skip_value = False
        elif top.key is None:
            if not isinstance(node, YScalar):
                self.error("E102", "mapping keys must be plain names", node.span)
                top.skip_value = True
            elif node.value in top.seen:
                first = top.seen[node.value]
                self.error("E103", f"duplicate key '{node.value}' (first defined at line {first.line})",
                           node.span, "YAML keeps only the last of two equal keys; remove or rename one")
                top.skip_value = True
            else:
                top.seen[node.value] = node.span
                top.key = node
        else:
            top.items.append((top.key, node))
            top.key = None


def load_yaml(text: str, file: str, diags: Diagnostics) -> YNode | None:
    """Parse one YAML document; syntax problems become diagnostics and give None."""
    composer = _Composer(file, diags)
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if not composer.feed(event):
                return None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        span = SourceSpan(file, mark.line + 1, mark.column + 1) if mark else SourceSpan(file, 1, 1)
        problem = exc.problem or exc.context or "invalid YAML"
        diags.error("E101", f"YAML syntax: {problem}", span,
                    "check indentation and that values containing ': ' or '#' are quoted")
        return None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow
        line, col = text_position(text, exc.position)
        diags.error("E101", f"YAML syntax: character {exc.character:#x} is not allowed in YAML",
                    SourceSpan(file, line, col),
                    "write control characters in a double-quoted string as escapes, e.g. \\t")
        return None
    except yaml.YAMLError as exc:  # pragma: no cover - the parser's errors carry marks
        diags.error("E101", f"YAML syntax: {exc}", SourceSpan(file, 1, 1))
        return None
    if composer.root is None:
        diags.error("E101", "the spec is empty", SourceSpan(file, 1, 1))
        return None
    return composer.root
