"""Parse expression strings from a spec into AST nodes whose spans point into the spec file."""

from __future__ import annotations

import functools
import re
from importlib import resources

import lark

from ..diagnostics import Diagnostics, SourceSpan, shown
from .ast import (SIZE_UNITS, TIME_UNITS, Binary, Call, Compare, Expr, Integer, Logical, Name,
                  Quantity, String, Unary)

# What a person should read instead of lark's terminal names.
_TERMINAL_WORDS = {
    "OR": "'or'", "AND": "'and'", "NOT": "'not'", "COMPARE": "a comparison",
    "BITOR": "'|'", "BITAND": "'&'", "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'",
    "SLASH": "'/'", "PERCENT": "'%'", "LPAR": "'('", "RPAR": "')'", "DOT": "'.'", "COMMA": "','",
    "QUANTITY": "a quantity like 50ms", "INTEGER": "a number", "STRING": "a string",
    "IDENT": "a name", "$END": "the end of the expression",
}

_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", '"': '"'}

# Bounds on what the parser hands on. Every later stage walks the tree recursively, so a parse
# tree deeper than this is refused here; the loader then holds expressions to what clang compiles
# (limits.MAX_EXPRESSION_DEPTH, E134). A real filter is a few levels deep.
MAX_DEPTH = 256
MAX_DIGITS = 40          # read as a number at all; typing then holds values to what backends represent


class _TooLarge(Exception):
    def __init__(self, span: SourceSpan, what: str):
        self.span, self.what = span, what


@functools.lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    grammar = resources.files(__package__).joinpath("expr.lark").read_text()
    # cache=True keeps the LALR tables in a temp file keyed by a hash of the grammar and lark's
    # version: building them costs more than the rest of a check.
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=False, cache=True)


def _unquote(token: str) -> str:
    body = token[1:-1]
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), body)


class _Builder:
    def __init__(self, base: SourceSpan):
        self.base = base

    def span(self, start: int, end: int) -> SourceSpan:
        return self.base.shifted(start, end - start)

    def build(self, node) -> Expr:
        if isinstance(node, lark.Token):
            raise AssertionError(f"unexpected token {node.type}")  # pragma: no cover
        kind = node.data
        kids = node.children
        if kind == "integer":
            tok = kids[0]
            digits = tok.replace("_", "")
            span = self.span(tok.start_pos, tok.end_pos)
            if len(digits) > MAX_DIGITS:
                raise _TooLarge(span, "a number")
            return Integer(int(digits, 0), span)
        if kind == "quantity":
            tok = kids[0]
            span = self.span(tok.start_pos, tok.end_pos)
            m = re.fullmatch(r"([0-9_]+)(?:\.([0-9]+))?([A-Za-z]+)", str(tok))
            whole, frac, unit = m.group(1).replace("_", ""), (m.group(2) or "")[:MAX_DIGITS], m.group(3)
            scale, dim = (TIME_UNITS[unit], "time") if unit in TIME_UNITS else (SIZE_UNITS[unit], "size")
            if len(whole) > MAX_DIGITS:
                raise _TooLarge(span, "a quantity")
            value = int(whole) * scale + ((int(frac) * scale) // (10 ** len(frac)) if frac else 0)
            return Quantity(value, dim, str(tok), span)
        if kind == "string":
            tok = kids[0]
            return String(_unquote(str(tok)), self.span(tok.start_pos, tok.end_pos))
        if kind == "name":
            idents = [k for k in kids if k.type == "IDENT"]
            return Name(tuple(str(k) for k in idents), self.span(kids[0].start_pos, kids[-1].end_pos))
        span = self.span(node.meta.start_pos, node.meta.end_pos)
        if kind == "call":
            name = kids[0]
            args = tuple(self.build(k) for k in kids[1:] if not isinstance(k, lark.Token))
            return Call(str(name), args, span, self.span(name.start_pos, name.end_pos))
        if kind == "unary":
            op = "!" if kids[0].type == "NOT" else "-"
            return Unary(op, self.build(kids[1]), span)
        if kind == "atom":  # parenthesised
            return self.build(kids[1])
        left, op, right = self.build(kids[0]), kids[1], self.build(kids[2])
        if kind == "binary":
            return Binary(str(op), left, right, span)
        if kind == "compare":
            return Compare(str(op), left, right, span)
        if kind == "logical":
            return Logical("&&" if op.type == "AND" else "||", left, right, span)
        raise AssertionError(f"unknown node {kind}")  # pragma: no cover


def parse_expression(text: str, base: SourceSpan, diags: Diagnostics) -> Expr | None:
    """Parse `text`; `base` is the span of its first character in the spec file."""
    try:
        tree = _parser().parse(text)
    except lark.UnexpectedCharacters as exc:
        diags.error("E201", f"unexpected character {text[exc.pos_in_stream]!r} in expression",
                    base.shifted(exc.pos_in_stream, 1),
                    "strings are written in double quotes; names are letters, digits and '_'")
        return None
    except lark.UnexpectedToken as exc:
        tok = exc.token
        expected = sorted({_TERMINAL_WORDS.get(t, t) for t in exc.expected})
        if tok.type == "$END":
            where, what = len(text), "the expression ends too early"
        else:
            word = _TERMINAL_WORDS.get(tok.type, tok.type)
            where = tok.start_pos
            what = f"unexpected {word}" if word.startswith("'") else f"unexpected {word} '{shown(str(tok))}'"
        diags.error("E202", f"{what} in expression", base.shifted(where or 0, len(str(tok)) or 1),
                    "expected " + ", ".join(expected[:6]) if expected else "")
        return None
    except lark.UnexpectedEOF:  # pragma: no cover - lalr reports UnexpectedToken
        diags.error("E202", "the expression ends too early", base.shifted(len(text), 1))
        return None
    if isinstance(tree, lark.Token):  # a lone terminal collapsed by `?start`
        tree = lark.Tree({"INTEGER": "integer", "QUANTITY": "quantity", "STRING": "string"}[tree.type], [tree])
    deepest = _deepest(tree)
    if deepest is not None:
        diags.error("E203", f"expression nested more than {MAX_DEPTH} levels deep", base.shifted(
                    deepest.meta.start_pos, deepest.meta.end_pos - deepest.meta.start_pos),
                    "split it: a filter is usually a few comparisons joined by 'and'/'or'")
        return None
    try:
        return _Builder(base).build(tree)
    except _TooLarge as exc:
        diags.error("E203", f"{exc.what} of more than {MAX_DIGITS} digits in expression", exc.span,
                    "numbers are signed 64-bit in bpftrace: at most 9,223,372,036,854,775,807")
        return None


def _deepest(tree: lark.Tree) -> lark.Tree | None:
    """The first subtree more than MAX_DEPTH levels below the root, found without recursion."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return node
        stack.extend((k, depth + 1) for k in node.children if isinstance(k, lark.Tree))
    return None
