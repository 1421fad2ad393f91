"""Name resolution and typing of expressions in the context of the probe that evaluates them."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..diagnostics import Diagnostics, SourceSpan, did_you_mean
from ..expr import ast
from ..kinds import PROBE_KINDS
from ..spec.limits import LIMITS
from .host import FormatField
from .nodes import (COMM, INT, SINT, TID, ActiveSpan, Arg, FdSocket, BinOp, Cmp, Const, Context, Duration, IRExpr,
                    Logic, Neg, Not, Retval, SpanTotal, StrConst, StrEq, TIME, TracepointField, ValueType)

CONTEXT_NAMES = {"pid": INT, "tid": INT, "comm": COMM, "cgroup": INT, "cpu": INT, "uid": INT}
# Where positional arguments and a return value can be read: compiler/kinds.py.
ARG_KINDS = {k.name: k.args for k in PROBE_KINDS.values() if k.args}
RETVAL_KINDS = tuple(k.name for k in PROBE_KINDS.values() if k.retval)
ADDRESS_HINT = "an IPv4 address (__u8[4]) can be a label, an event field or a span key, shown as a dotted quad"


@dataclass
class ProbeContext:
    """What an expression may use where it runs."""
    kind: str                                  # the probe kind as lowered
    description: str                           # e.g. "tracepoint:sched:sched_switch"
    fields: dict[str, FormatField] | None = None  # tracepoint fields; None: unknown (host not read)
    has_fields: bool = False                   # tracepoint-like context
    arg_count: int | None = None               # usdt: known number of arguments
    duration: bool = False                     # inside a span's end
    ending: str = ""                           # the span that ends here, if any
    within: dict = field(default_factory=dict)  # every span -> the span it is `within` ("" if none)
    counted: dict = field(default_factory=dict)  # counters with `within` -> that span
    notes: list[tuple[str, SourceSpan]] = field(default_factory=list)   # fields not checked, and where
    ending_key: IRExpr = TID                   # the key of the span that ends here, as computed here
    thread_spans: frozenset = frozenset()      # spans keyed by the current thread

    def names(self) -> list[str]:
        out = list(CONTEXT_NAMES)
        if self.kind in ARG_KINDS:
            out += [f"arg{i}" for i in range(self.arg_count if self.arg_count is not None else ARG_KINDS[self.kind])]
        if self.kind in RETVAL_KINDS:
            out.append("retval")
        if self.has_fields and self.fields:
            out += [f"args.{n}" for n in self.fields]
        if self.duration:
            out.append("duration")
        return out + [f"{inner}.total" for inner in self.inner_spans] + [f"{inner}.count" for inner in self.inner_spans] \
            + [f"{c}.count" for c, outer in self.counted.items() if outer == self.ending]

    @property
    def inner_spans(self) -> list[str]:
        return [n for n, outer in self.within.items() if outer == self.ending] if self.ending else []


class TypeChecker:
    def __init__(self, diags: Diagnostics):
        self.d = diags
        self.totals_used: set[str] = set()      # inner spans whose .total/.count something reads
        self.active_used: set[str] = set()      # spans some active(...) asks about

    def condition(self, expr: ast.Expr, ctx: ProbeContext, what: str) -> IRExpr | None:
        ir = self.check(expr, ctx)
        if ir is None:
            return None
        if ir.type.kind != "bool":
            hint = "compare it, e.g. 'X != 0'" if ir.type.kind == "int" else "compare it, e.g. 'comm == \"server\"'"
            self.d.error("E210", f"{what} must be a condition, but this is {ir.type.describe()}", expr.span, hint)
            return None
        return ir

    def value(self, expr: ast.Expr, ctx: ProbeContext, what: str, allow_string: bool = False,
              allow_address: bool = False) -> IRExpr | None:
        """A number (or a string, or an IPv4 address, where the caller shows it as it is: labels,
        event fields, keys). bpftrace has an address only as ntop()'s text, which it neither adds
        nor compares, so an address is never a value to sum or bucket."""
        ir = self.check(expr, ctx)
        if ir is None:
            return None
        if ir.type.kind == "bool" or (ir.type.kind == "str" and not allow_string) or \
                (ir.type.render == "ipv4" and not allow_address):
            self.d.error("E211", f"{what} must be a number, but this is {ir.type.describe()}", expr.span,
                         ADDRESS_HINT if ir.type.render == "ipv4" else "")
            return None
        return ir

    def check(self, e: ast.Expr, ctx: ProbeContext) -> IRExpr | None:
        if isinstance(e, (ast.Integer, ast.Quantity)):
            if e.value > LIMITS["integer"].high:
                self.d.error("E212", f"{e.value:,} is past the largest number both backends represent, "
                             f"{LIMITS['integer'].high:,}" + (f" ({e.text} in base units)"
                                                               if isinstance(e, ast.Quantity) else ""),
                             e.span, LIMITS["integer"].why)
                return None
            if isinstance(e, ast.Quantity):
                return Const(e.value, ValueType("int", e.dimension))
            return Const(e.value)
        if isinstance(e, ast.String):
            try:
                data = e.value.encode("ascii")
            except UnicodeEncodeError:
                self.d.error("E213", "strings must be ASCII", e.span)
                return None
            if any(b < 0x20 or b == 0x7F for b in data):
                self.d.error("E213", "strings may not contain control characters", e.span)
                return None
            return StrConst(data, ValueType("str", length=len(data) + 1))
        if isinstance(e, ast.Name):
            return self.name(e, ctx)
        if isinstance(e, ast.Call):
            return self.call(e, ctx)
        if isinstance(e, ast.Unary):
            inner = self.check(e.operand, ctx)
            if inner is None:
                return None
            if e.op == "!":
                if inner.type.kind != "bool":
                    self.d.error("E214", f"'not' needs a condition, but this is {inner.type.describe()}", e.operand.span)
                    return None
                return Not(inner)
            if inner.type.kind != "int" or inner.type.render == "ipv4":
                self.d.error("E214", f"'-' needs a number, but this is {inner.type.describe()}", e.operand.span,
                             ADDRESS_HINT if inner.type.render == "ipv4" else "")
                return None
            return Neg(inner, ValueType("int", inner.type.dimension, signed=True))
        if isinstance(e, ast.Logical):
            left, right = self.check(e.left, ctx), self.check(e.right, ctx)
            if left is None or right is None:
                return None
            for side, node in ((left, e.left), (right, e.right)):
                if side.type.kind != "bool":
                    self.d.error("E214", f"'{'and' if e.op == '&&' else 'or'}' needs conditions on both sides, "
                                 f"but this is {side.type.describe()}", node.span)
                    return None
            return Logic(e.op, left, right)
        if isinstance(e, ast.Compare):
            return self.compare(e, ctx)
        if isinstance(e, ast.Binary):
            left, right = self.check(e.left, ctx), self.check(e.right, ctx)
            if left is None or right is None:
                return None
            for side, node in ((left, e.left), (right, e.right)):
                if side.type.kind != "int" or side.type.render == "ipv4":
                    self.d.error("E214", f"'{e.op}' needs numbers, but this is {side.type.describe()}", node.span,
                                 ADDRESS_HINT if side.type.render == "ipv4" else "")
                    return None
            dim = self.arith_dimension(e, left.type, right.type)
            if dim is None:
                return None
            return BinOp(e.op, left, right, ValueType("int", dim, signed=left.type.signed or right.type.signed))
        raise AssertionError(type(e))  # pragma: no cover

    def arith_dimension(self, e: ast.Binary, lt: ValueType, rt: ValueType) -> str | None:
        if e.op in "+-":
            if "none" not in (lt.dimension, rt.dimension) and lt.dimension != rt.dimension:
                self.d.error("E215", f"cannot add {lt.describe()} and {rt.describe()}", e.span)
                return None
            return lt.dimension if lt.dimension != "none" else rt.dimension
        if e.op in "*" and "none" in (lt.dimension, rt.dimension):
            return lt.dimension if lt.dimension != "none" else rt.dimension
        if e.op == "/" and rt.dimension == "none":
            return lt.dimension
        if e.op == "/" and lt.dimension == rt.dimension:
            return "none"
        if lt.dimension == rt.dimension == "none":
            return "none"
        self.d.error("E215", f"'{e.op}' of {lt.describe()} and {rt.describe()} has no meaning here", e.span)
        return None

    def compare(self, e: ast.Compare, ctx: ProbeContext) -> IRExpr | None:
        left, right = self.check(e.left, ctx), self.check(e.right, ctx)
        if left is None or right is None:
            return None
        # A tracepoint field whose layout was not read (check --no-host) takes the type it is
        # compared with: a string field compared with a string is no error of the spec.
        left, right = (_as_string_if_unread(left, right.type), _as_string_if_unread(right, left.type))
        lt, rt = left.type, right.type
        if lt.kind == "str" or rt.kind == "str":
            if lt.kind != rt.kind:
                str_side, other_side = (e.left, e.right) if lt.kind == "str" else (e.right, e.left)
                other = rt if lt.kind == "str" else lt
                if isinstance(str_side, ast.String):   # pid == "x": the literal is the mistake
                    self.d.error("E216", f"cannot compare {other.describe()} with a string", str_side.span,
                                 "compare it with a number")
                else:                                   # comm == 5: the number is the mistake
                    self.d.error("E216", f"cannot compare a string with {other.describe()}", other_side.span,
                                 "write the string in double quotes, e.g. comm == \"server\"")
                return None
            if isinstance(left, StrConst) and not isinstance(right, StrConst):
                left, right = right, left
            if not isinstance(right, StrConst) or isinstance(left, StrConst):
                self.d.error("E216", "strings can only be compared with a string literal", e.span)
                return None
            if e.op not in ("==", "!="):
                self.d.error("E216", f"strings compare only with == and !=, not '{e.op}'", e.span)
                return None
            if len(right.value) >= left.type.length:
                lit = e.right if isinstance(e.right, ast.String) else e.left
                self.d.error("E217", f"\"{right.value.decode()}\" has {len(right.value)} characters but this value "
                             f"holds at most {left.type.length - 1}: the comparison can never be true", lit.span,
                             "the kernel truncates comm to 15 characters; compare with the truncated name")
                return None
            return StrEq(e.op, left, right)
        if lt.kind != "int" or rt.kind != "int":
            bad = e.left if lt.kind != "int" else e.right
            self.d.error("E216", f"'{e.op}' needs numbers on both sides", bad.span)
            return None
        if "ipv4" in (lt.render, rt.render):
            bad = e.left if lt.render == "ipv4" else e.right
            self.d.error("E216", f"'{e.op}' needs numbers on both sides, but this is an IPv4 address", bad.span,
                         ADDRESS_HINT)
            return None
        if lt.dimension != rt.dimension:
            plain = e.right if rt.dimension == "none" else e.left
            other = lt if rt.dimension == "none" else rt
            self.d.error("E215", f"cannot compare {other.describe()} with a plain number", plain.span,
                         "give the number a unit, e.g. 50ms or 4KiB" if isinstance(plain, ast.Integer) else "")
            return None
        return Cmp(e.op, left, right)

    FUNCTIONS = ("active", "active_at", "socket")

    def call(self, e: ast.Call, ctx: ProbeContext) -> IRExpr | None:
        if e.name not in self.FUNCTIONS:
            self.d.error("E226", f"unknown function '{e.name}'", e.name_span,
                         did_you_mean(e.name, self.FUNCTIONS) or "functions: " + ", ".join(self.FUNCTIONS))
            return None
        if e.name == "socket":
            if len(e.args) != 1:
                self.d.error("E226", f"socket(FD) takes one file descriptor, not {len(e.args)} arguments", e.span,
                             "e.g. socket(args.fd) at syscall:sendto")
                return None
            fd = self.check(e.args[0], ctx)
            if fd is None:
                return None
            if fd.type.kind != "int" or fd.type.dimension != "none" or fd.type.render:
                self.d.error("E226", f"socket(FD) needs a file descriptor, but this is {fd.type.describe()}",
                             e.args[0].span)
                return None
            return FdSocket(fd)
        # active(a, b, ...): which of these spans is open on this thread, the first listed winning;
        # active_at(KEY, a, b, ...): the same at KEY, for spans with a key of their own
        args, key = list(e.args), None
        if e.name == "active_at":
            if len(args) < 2:
                self.d.error("E226", "active_at(KEY, SPAN, ...) needs a key and the spans to ask about", e.span,
                             "e.g. active_at(args.skaddr, request)")
                return None
            key = self.check(args.pop(0), ctx)
            if key is None:
                return None
            if key.type.kind != "int" or key.type.dimension != "none":
                self.d.error("E226", f"active_at's key must be a number, but this is {key.type.describe()}",
                             e.args[0].span)
                return None
        if not args:
            self.d.error("E226", "active(...) needs the spans to ask about", e.span,
                         "e.g. active(send, inference): list the innermost first")
            return None
        spans: list[str] = []
        for arg in args:
            if not isinstance(arg, ast.Name) or len(arg.parts) != 1 or arg.parts[0] not in ctx.within:
                word = arg.dotted if isinstance(arg, ast.Name) else "this"
                self.d.error("E226", f"active(...) takes span names, and '{word}' is not a span", arg.span,
                             did_you_mean(word, list(ctx.within)) if isinstance(arg, ast.Name) else "")
                return None
            name = arg.parts[0]
            if key is None and name not in ctx.thread_spans:
                self.d.error("E226", f"active({name}) asks the current thread, but span '{name}' has a key of "
                             "its own", arg.span, f"ask at its key: active_at(KEY, {name})")
                return None
            if name in spans:
                self.d.error("E226", f"span '{name}' is listed twice", arg.span)
                return None
            spans.append(name)
        self.active_used.update(spans)
        return ActiveSpan(tuple(spans), ValueType("int", render="enum", names=("none", *spans)),
                          key if key is not None else TID)

    def name(self, e: ast.Name, ctx: ProbeContext) -> IRExpr | None:
        dotted = e.dotted
        if len(e.parts) == 1:
            n = e.parts[0]
            if n in CONTEXT_NAMES:
                return Context(n, CONTEXT_NAMES[n])
            if n == "duration":
                if ctx.duration:
                    return Duration()
                self.d.error("E220", f"'duration' is only known where a span ends, not in {ctx.description}",
                             e.span, "put this on 'SPAN.end', or use 'SPAN.duration' in a metric")
                return None
            if n.startswith("arg") and n[3:].isdigit():
                index = int(n[3:]) if len(n) <= 8 else 1 << 20   # arg9999...: past any probe's count
                limit = ARG_KINDS.get(ctx.kind)
                if limit is None:
                    hint = "tracepoints name their fields: args.NAME" if ctx.has_fields else \
                        "use 'retval' at a return probe" if ctx.kind in RETVAL_KINDS else ""
                    self.d.error("E221", f"{ctx.description} has no positional arguments", e.span, hint)
                    return None
                count = ctx.arg_count if ctx.arg_count is not None else limit
                if index >= count:
                    self.d.error("E221", f"{ctx.description} has {count} argument(s): arg0..arg{count - 1}", e.span)
                    return None
                return Arg(index)
            if n == "retval":
                if ctx.kind in RETVAL_KINDS:
                    return Retval()
                self.d.error("E221", f"'retval' is only known at a return probe, not in {ctx.description}", e.span,
                             "use uretprobe:, kretprobe:, fexit: or syscallret:")
                return None
        if len(e.parts) == 2 and e.parts[1] == "count" and e.parts[0] in ctx.counted:
            counter, outer = e.parts[0], ctx.counted[e.parts[0]]
            if ctx.ending != outer:
                self.d.error("E225", f"'{dotted}' is known where span '{outer}' ends (the counter is within it), "
                             f"not in {ctx.description}", e.span, f"put this on '{outer}.end'")
                return None
            self.totals_used.add(counter)
            return SpanTotal(counter, "count", INT, ctx.ending_key)
        if len(e.parts) == 2 and e.parts[1] in ("total", "count") and e.parts[0] in ctx.within:
            inner, what = e.parts
            outer = ctx.within[inner]
            if not outer:
                self.d.error("E225", f"'{dotted}' needs span '{inner}' to be 'within' another span", e.span,
                             f"add 'within: OUTER' to span '{inner}' and read '{dotted}' at OUTER.end")
                return None
            if ctx.ending != outer:
                self.d.error("E225", f"'{dotted}' is known where span '{outer}' ends (the span '{inner}' is within), "
                             f"not in {ctx.description}", e.span, f"put this on '{outer}.end'")
                return None
            self.totals_used.add(inner)
            return SpanTotal(inner, what, TIME if what == "total" else INT, ctx.ending_key)
        if e.parts[0] == "args" and len(e.parts) == 2:
            if not ctx.has_fields:
                self.d.error("E222", f"{ctx.description} has no named fields",
                             e.span, "use arg0..argN at uprobes and USDT probes")
                return None
            fname = e.parts[1]
            if ctx.fields is None:
                ctx.notes.append((fname, e.span))
                return TracepointField(fname, -1, 8, INT)
            fmt = ctx.fields.get(fname)
            if fmt is None:
                self.d.error("E223", f"{ctx.description} has no field '{fname}'", e.span,
                             did_you_mean(fname, ctx.fields) or "fields: " + ", ".join(ctx.fields))
                return None
            if fmt.ctype.startswith("__data_loc") or fmt.ctype.startswith("__rel_loc"):
                self.d.error("E224", f"field '{fname}' is a variable-length string; probec reads fixed fields only",
                             e.span)
                return None
            if fmt.is_string:
                return TracepointField(fname, fmt.offset, fmt.size, ValueType("str", length=fmt.array_len))
            if fmt.array_len == 4 and fmt.size == 4 and fmt.ctype.split()[-1] in ("__u8", "u8", "unsigned char"):
                # an IPv4 address in network order: a number in the kernel, a dotted quad in labels
                return TracepointField(fname, fmt.offset, fmt.size, ValueType("int", render="ipv4"))
            if fmt.array_len or fmt.size not in (1, 2, 4, 8):
                self.d.error("E224", f"field '{fname}' ({fmt.ctype}[{fmt.array_len}]) is an array; "
                             "probec reads numbers, char arrays and IPv4 addresses (__u8[4])", e.span)
                return None
            ckind = "ptr" if "*" in fmt.ctype else ("enum" if fmt.ctype.startswith("enum ") else "int")
            return TracepointField(fname, fmt.offset, fmt.size, SINT if fmt.signed else INT, ckind)
        self.d.error("E220", f"unknown name '{dotted}' in {ctx.description}", e.span,
                     did_you_mean(dotted, ctx.names()) or "known here: " + ", ".join(ctx.names()[:12]))
        return None


UNREAD_FIELD_STRING = ValueType("str", length=256)   # longer than any char[] a tracepoint has


def _as_string_if_unread(e: IRExpr, other: ValueType) -> IRExpr:
    if isinstance(e, TracepointField) and e.offset < 0 and other.kind == "str":
        return TracepointField(e.name, e.offset, e.size, UNREAD_FIELD_STRING)
    return e
