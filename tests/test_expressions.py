from probec.compiler.diagnostics import Diagnostics, SourceSpan
from probec.compiler.expr import ast
from probec.compiler.expr.parser import parse_expression

BASE = SourceSpan("spec.yaml", 7, 13)


def parse(text):
    d = Diagnostics()
    return parse_expression(text, BASE, d), d


def test_precedence_and_keywords():
    e, d = parse('comm == "srv" and not pid == 3 or duration > 50ms')
    assert not d.items
    assert isinstance(e, ast.Logical) and e.op == "||"
    assert isinstance(e.left, ast.Logical) and e.left.op == "&&"
    assert isinstance(e.left.right, ast.Unary) and e.left.right.op == "!"
    assert e.right.right == ast.Quantity(50_000_000, "time", "50ms", e.right.right.span)


def test_names_that_start_with_keywords_are_names():
    e, d = parse("order == 1 and notes != 2")
    assert not d.items
    assert e.left.left.parts == ("order",)
    assert e.right.left.parts == ("notes",)


def test_units_scale_to_base_units():
    for text, value, dim in [("1us", 1000, "time"), ("1.5ms", 1_500_000, "time"), ("2s", 2_000_000_000, "time"),
                             ("4KiB", 4096, "size"), ("1MB", 1_000_000, "size"), ("10ns", 10, "time")]:
        e, d = parse(text)
        assert (e.value, e.dimension) == (value, dim), text


def test_string_escapes():
    e, _ = parse(r'comm == "a\"b\\c"')
    assert e.right.value == 'a"b\\c'


def test_spans_point_into_the_file():
    e, _ = parse("pid  ==   42")
    assert (e.left.span.line, e.left.span.col) == (7, 13)
    assert (e.right.span.col, e.right.span.end_col) == (13 + 10, 13 + 12)


def test_syntax_errors_name_real_tokens_and_columns():
    _, d = parse("pid == ")
    [diag] = d.items
    assert diag.code == "E202" and "ends too early" in diag.message
    assert "a number" in diag.hints[0]
    _, d = parse("pid $ 3")
    [diag] = d.items
    assert diag.code == "E201" and diag.span.col == 13 + 4
    _, d = parse("(pid == 3")
    assert "__ANON" not in d.items[0].message + "".join(d.items[0].hints)


def test_function_calls():
    e, d = parse("active(send, forward) == 1 and socket(args.fd) != 0")
    assert not d.items
    call = e.left.left
    assert isinstance(call, ast.Call) and call.name == "active"
    assert [a.parts for a in call.args] == [("send",), ("forward",)]
    assert (call.name_span.col, call.name_span.end_col) == (13, 13 + len("active"))
    sock = e.right.left
    assert sock.name == "socket" and sock.args[0].parts == ("args", "fd")
    _, d = parse("active(send,)")
    assert d.items[0].code == "E202" and "','" not in d.items[0].message
