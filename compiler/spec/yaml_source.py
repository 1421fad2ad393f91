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


def _span(file: str, node: yaml.Node) -> SourceSpan:
    s, e = node.start_mark, node.end_mark
    return SourceSpan(file, s.line + 1, s.column + 1, e.line + 1, e.column + 1)


def _convert(file: str, node: yaml.Node, diags: Diagnostics) -> YNode:
    if isinstance(node, yaml.ScalarNode):
        quoted = node.style in ("'", '"')
        return YScalar(str(node.value), _span(file, node), quoted, 1 if quoted else 0)
    if isinstance(node, yaml.SequenceNode):
        return YSeq(tuple(_convert(file, n, diags) for n in node.value), _span(file, node))
    if isinstance(node, yaml.MappingNode):
        entries: list[tuple[YScalar, YNode]] = []
        seen: dict[str, SourceSpan] = {}
        for knode, vnode in node.value:
            key = _convert(file, knode, diags)
            if not isinstance(key, YScalar):
                diags.error("E102", "mapping keys must be plain names", key.span)
                continue
            if key.value in seen:
                first = seen[key.value]
                diags.error("E103", f"duplicate key '{key.value}' (first defined at line {first.line})",
                            key.span, "YAML keeps only the last of two equal keys; remove or rename one")
                continue
            seen[key.value] = key.span
            entries.append((key, _convert(file, vnode, diags)))
        return YMap(tuple(entries), _span(file, node))
    raise AssertionError(f"unknown YAML node {type(node).__name__}")  # pragma: no cover


def load_yaml(text: str, file: str, diags: Diagnostics) -> YNode | None:
    """Parse one YAML document; syntax problems become diagnostics and give None."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        span = SourceSpan(file, mark.line + 1, mark.column + 1) if mark else None
        problem = exc.problem or exc.context or "invalid YAML"
        diags.error("E101", f"YAML syntax: {problem}", span,
                    "check indentation and that values containing ': ' or '#' are quoted")
        return None
    except yaml.YAMLError as exc:  # composer errors without marks
        diags.error("E101", f"YAML syntax: {exc}", SourceSpan(file, 1, 1))
        return None
    if root is None:
        diags.error("E101", "the spec is empty", SourceSpan(file, 1, 1))
        return None
    return _convert(file, root, diags)
