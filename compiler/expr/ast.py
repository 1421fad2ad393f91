"""The typed-later AST of the expression language, with the source span of every node."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ..diagnostics import SourceSpan

# Units a quantity literal may carry, and what one of each is in base units (ns, bytes).
TIME_UNITS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
              "min": 60_000_000_000, "h": 3_600_000_000_000}
SIZE_UNITS = {"B": 1, "KB": 1_000, "MB": 1_000_000, "GB": 1_000_000_000,
              "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


@dataclass(frozen=True)
class Integer:
    value: int
    span: SourceSpan


@dataclass(frozen=True)
class Quantity:
    """A literal with a unit, already scaled to base units: `50ms` is 50_000_000 ns."""
    value: int
    dimension: str        # "time" or "size"
    text: str
    span: SourceSpan


@dataclass(frozen=True)
class String:
    value: str
    span: SourceSpan


@dataclass(frozen=True)
class Name:
    """`pid`, `arg0`, `args.next_pid`, `inference.duration`: dotted parts."""
    parts: tuple[str, ...]
    span: SourceSpan

    @property
    def dotted(self) -> str:
        return ".".join(self.parts)


@dataclass(frozen=True)
class Unary:
    op: str               # "!" or "-"
    operand: "Expr"
    span: SourceSpan


@dataclass(frozen=True)
class Binary:
    op: str               # + - * / % & |
    left: "Expr"
    right: "Expr"
    span: SourceSpan


@dataclass(frozen=True)
class Compare:
    op: str               # == != < <= > >=
    left: "Expr"
    right: "Expr"
    span: SourceSpan


@dataclass(frozen=True)
class Logical:
    op: str               # && ||
    left: "Expr"
    right: "Expr"
    span: SourceSpan


@dataclass(frozen=True)
class Call:
    """`active(send, forward)`: a function of the language applied to its arguments."""
    name: str
    args: tuple["Expr", ...]
    span: SourceSpan
    name_span: SourceSpan


Expr = Union[Integer, Quantity, String, Name, Unary, Binary, Compare, Logical, Call]


def walk(expr: Expr):
    """Every node of an expression, parents before children."""
    yield expr
    if isinstance(expr, Unary):
        yield from walk(expr.operand)
    elif isinstance(expr, (Binary, Compare, Logical)):
        yield from walk(expr.left)
        yield from walk(expr.right)
    elif isinstance(expr, Call):
        for arg in expr.args:
            yield from walk(arg)
