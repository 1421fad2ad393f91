"""Diagnostics: what the compiler tells a person, with where and what to do about it.

A diagnostic has a severity, a stable code, a message, a source span and hints. They are
collected, never raised one at a time, so that one run of `probec check` reports every problem.
"""

from __future__ import annotations


import difflib
import json
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Iterable

from .escaping import one_line


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"
    NOTE = "note"


@dataclass(frozen=True)
class SourceSpan:
    """A place in a source file: 1-based line and column, end exclusive on the same line."""

    file: str
    line: int
    col: int
    end_line: int = 0
    end_col: int = 0

    def shifted(self, columns: int, length: int) -> "SourceSpan":
        """A span `columns` to the right of this one's start, `length` characters wide."""
        col = self.col + columns
        return SourceSpan(self.file, self.line, col, self.line, col + max(length, 1))


@dataclass(frozen=True)
class Diagnostic:
    severity: Severity
    code: str
    message: str
    span: SourceSpan | None
    hints: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        place = None
        if self.span is not None:
            place = {"file": self.span.file, "line": self.span.line, "col": self.span.col,
                     "end_line": self.span.end_line or self.span.line,
                     "end_col": self.span.end_col or self.span.col + 1}
        return {"severity": self.severity.value, "code": self.code, "message": self.message,
                "span": place, "hints": list(self.hints)}


class CompileError(Exception):
    """Raised by a stage that cannot go on; carries the diagnostics collected so far."""

    def __init__(self, diagnostics: "Diagnostics"):
        super().__init__(f"{diagnostics.error_count} error(s)")
        self.diagnostics = diagnostics


@dataclass
class Diagnostics:
    items: list[Diagnostic] = field(default_factory=list)

    def error(self, code: str, message: str, span: SourceSpan | None, *hints: str) -> None:
        self.items.append(Diagnostic(Severity.ERROR, code, message, span, tuple(h for h in hints if h)))

    def warning(self, code: str, message: str, span: SourceSpan | None, *hints: str) -> None:
        self.items.append(Diagnostic(Severity.WARNING, code, message, span, tuple(h for h in hints if h)))

    def note_last(self, hint: str) -> None:
        """Add a hint to the latest diagnostic: what the check that failed was for."""
        if self.items:
            last = self.items[-1]
            self.items[-1] = replace(last, hints=last.hints + (hint,))

    def extend(self, other: "Diagnostics") -> None:
        self.items.extend(other.items)

    @property
    def error_count(self) -> int:
        return sum(1 for d in self.items if d.severity is Severity.ERROR)

    @property
    def warning_count(self) -> int:
        return sum(1 for d in self.items if d.severity is Severity.WARNING)

    def has_errors(self) -> bool:
        return self.error_count > 0

    def raise_if_errors(self) -> None:
        if self.has_errors():
            raise CompileError(self)

    def sorted(self) -> list[Diagnostic]:
        def place(d: Diagnostic):
            s = d.span
            return (s.file, s.line, s.col) if s else ("", 0, 0)
        return sorted(self.items, key=place)


def shown(text: str, limit: int = 60) -> str:
    """User text quoted in a message, cut to `limit` characters: a message must stay readable
    when the spec holds a 5,000-digit number."""
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def did_you_mean(name: str, candidates: Iterable[str], n: int = 1) -> str:
    """A `did you mean` hint for a misspelt name, or an empty string when nothing is close."""
    close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)
    if not close:
        return ""
    return "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"


def render_text(diagnostics: Iterable[Diagnostic], sources: dict[str, str], color: bool = False) -> str:
    """Render as `file:line:col: error[CODE]: message`, the source line, a caret, and help lines.
    File names, messages and hints quote outside text (paths, names): each stays on its line."""
    out: list[str] = []
    for d in diagnostics:
        sev = d.severity.value
        if color:
            tint = {"error": "\033[1;31m", "warning": "\033[1;33m", "note": "\033[1;36m"}[sev]
            sev = f"{tint}{sev}\033[0m"
        if d.span is None:
            out.append(f"{sev}[{d.code}]: {one_line(d.message)}")
        else:
            s = d.span
            out.append(f"{one_line(s.file)}:{s.line}:{s.col}: {sev}[{d.code}]: {one_line(d.message)}")
            lines = sources.get(s.file, "").splitlines()
            if 1 <= s.line <= len(lines):
                text = lines[s.line - 1].expandtabs(1)
                gutter = str(s.line)
                width = 1
                if s.end_line in (0, s.line) and s.end_col > s.col:
                    width = s.end_col - s.col
                width = max(1, min(width, len(text) - s.col + 1 if len(text) >= s.col else 1))
                text, col, width = _source_window(text, s.col, width)
                out.append(f" {gutter} | {text}")
                out.append(f" {' ' * len(gutter)} | {' ' * (col - 1)}{'^' * width}")
        for hint in d.hints:
            out.append(f"  help: {one_line(hint)}")
    return "\n".join(out) + ("\n" if out else "")


SOURCE_WIDTH = 100


def _source_window(text: str, col: int, width: int) -> tuple[str, int, int]:
    """At most SOURCE_WIDTH characters of a long source line around `col`, marked '...' where
    cut, with the column and caret width moved to match."""
    if len(text) <= SOURCE_WIDTH:
        return text, col, width
    start = max(0, min(col - 1 - SOURCE_WIDTH // 4, len(text) - SOURCE_WIDTH))
    head, tail = ("..." if start else ""), ("..." if start + SOURCE_WIDTH < len(text) else "")
    shown = head + text[start:start + SOURCE_WIDTH] + tail
    col = col - start + len(head)
    return shown, col, max(1, min(width, len(head) + SOURCE_WIDTH - col + 1))


def render_json(diagnostics: Iterable[Diagnostic]) -> str:
    return json.dumps([d.as_dict() for d in diagnostics], indent=2)


def render_github(diagnostics: Iterable[Diagnostic]) -> str:
    """GitHub Actions workflow commands: each diagnostic an annotation on its file and line."""
    from .escaping import github_data, github_property
    lines = []
    for d in diagnostics:
        kind = {Severity.ERROR: "error", Severity.WARNING: "warning"}.get(d.severity, "notice")
        props = [f"title={github_property(d.code)}"]
        if d.span is not None:
            props[:0] = [f"file={github_property(d.span.file)}", f"line={d.span.line}", f"col={d.span.col}",
                         f"endLine={d.span.end_line or d.span.line}", f"endColumn={d.span.end_col or d.span.col + 1}"]
        text = "\n".join([f"{d.code}: {d.message}", *(f"help: {h}" for h in d.hints)])
        lines.append(f"::{kind} {','.join(props)}::{github_data(text)}")
    return "\n".join(lines) + ("\n" if lines else "")


def render_sarif(diagnostics: Iterable[Diagnostic], version: str) -> str:
    """SARIF 2.1.0, as code-scanning services read it: one run of probec, a rule per code."""
    diagnostics = list(diagnostics)
    results = []
    for d in diagnostics:
        result = {"ruleId": d.code,
                  "level": {Severity.ERROR: "error", Severity.WARNING: "warning"}.get(d.severity, "note"),
                  "message": {"text": " ".join([d.message, *(f"help: {h}" for h in d.hints)])}}
        if d.span is not None:
            result["locations"] = [{"physicalLocation": {
                "artifactLocation": {"uri": d.span.file},
                "region": {"startLine": d.span.line, "startColumn": d.span.col,
                           "endLine": d.span.end_line or d.span.line,
                           "endColumn": d.span.end_col or d.span.col + 1}}}]
        results.append(result)
    rules = [{"id": code} for code in sorted({d.code for d in diagnostics})]
    return json.dumps({
        "version": "2.1.0",
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "runs": [{"tool": {"driver": {"name": "probec", "version": version, "rules": rules}},
                  "results": results}],
    }, indent=2)
