"""C++ names: demangling through libstdc++'s `__cxa_demangle`, and taking demangled names apart
into what a lookup can match (qualified name, parameters, template arguments, ABI tags)."""

from __future__ import annotations

import ctypes
import functools
import re
from typing import NamedTuple


@functools.lru_cache(maxsize=1)
def _cxa_demangle():
    """`(__cxa_demangle, free)` from libstdc++/libc, or None when libstdc++ is missing."""
    try:
        libstdcxx = ctypes.CDLL("libstdc++.so.6")
        libc = ctypes.CDLL(None)
        fn = getattr(libstdcxx, "__cxa_demangle")
        free = libc.free
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    fn.restype = ctypes.c_void_p
    free.argtypes = [ctypes.c_void_p]
    free.restype = None
    return fn, free


@functools.lru_cache(maxsize=1 << 17)
def demangle(name: str) -> str:
    """The C++ demangled form of `name`, or `name` itself when it is not an Itanium-mangled
    name, cannot be demangled, or libstdc++ is not installed. A `@VERSION` suffix is dropped
    from mangled names."""
    if not name.startswith("_Z"):
        return name
    demangler = _cxa_demangle()
    if demangler is None:
        return name
    fn, free = demangler
    base = name.split("@", 1)[0]
    status = ctypes.c_int(0)
    try:
        raw = base.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return name
    ptr = fn(raw, None, None, ctypes.byref(status))
    if not ptr:
        return name
    try:
        text = ctypes.string_at(ptr)
    finally:
        free(ptr)
    if status.value != 0:
        return name
    return text.decode("utf-8", "replace")


# Parsing demangled names back into "qualified name without parameters".

_CLONE_SUFFIX = re.compile(r"(?: \[clone [^\]]*\])+$")
_TRAILING_QUALIFIERS = (" const", " volatile", " &&", " &", " noexcept", " transaction_safe")
_ABI_TAG = re.compile(r"\[abi:[^\]]*\]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Names the Itanium ABI writes as substitutions (St, Sa, Sb, Ss, Si, So, Sd), so they may not
# appear in the mangled text when they are the last component (constructors, destructors).
_ABBREVIATED_STD = frozenset({"allocator", "basic_string", "string", "basic_istream", "istream",
                              "basic_ostream", "ostream", "basic_iostream", "iostream"})


def _strip_qualifiers(text: str) -> str:
    """`f(int) const &` -> `f(int)`; anything not ending in a parameter list is left alone."""
    stripped = text
    while not stripped.endswith(")"):
        for qualifier in _TRAILING_QUALIFIERS:
            if stripped.endswith(qualifier):
                stripped = stripped[:-len(qualifier)]
                break
        else:
            return text
    return stripped


def _strip_clone_suffix(text: str) -> str:
    return _CLONE_SUFFIX.sub("", text) if " [clone " in text else text


def _strip_abi_tags(text: str) -> str:
    return _ABI_TAG.sub("", text) if "[abi:" in text else text


_NOT_NESTING_OR_SPACE = re.compile(r"[^<>() ]+")
_ANGLES = re.compile(r"[<>]")
_OPERATOR = re.compile(r"\boperator\b")
_MEANINGLESS_SPACE = re.compile(r" (?:(?<=\W )|(?!\w))")  # a space not between two words


def _split_parameters(demangled: str) -> tuple[str, str | None]:
    """`(name part, parameter list)` of a demangled function, without `[clone ...]` suffixes
    and trailing qualifiers; the parameter list is None for names without one (C names)."""
    text = _strip_qualifiers(_strip_clone_suffix(demangled))
    if not text.endswith(")"):
        return text, None
    # Walk the parentheses from the right, the next ')' and the next '(' each found by rfind
    # (C code; a demangled name averages 340 characters in libtorch, but only 9 parentheses).
    depth = 0
    close = len(text) - 1
    opening = text.rfind("(", 0, close)
    while True:
        if close > opening:
            depth += 1
            close = text.rfind(")", 0, close)
        elif opening < 0:
            return text, None
        else:
            depth -= 1
            if depth == 0:
                return text[:opening], text[opening:]
            opening = text.rfind("(", 0, opening)


def _split_operator(name: str) -> tuple[str, str]:
    """`ns::Foo::operator<` -> (`ns::Foo::`, `operator<`): operator names hold <, >, ( and
    spaces that are not nesting."""
    match = _OPERATOR.search(name) if "operator" in name else None
    return (name[:match.start()], name[match.start():]) if match else (name, "")


def _drop_return_type(name: str) -> str:
    """`int ns::f<int>` -> `ns::f<int>`: cut at the last space outside <> and ()."""
    head, tail = _split_operator(name)
    if " " not in head:
        return name
    # Only the brackets and spaces matter: walk those (a regex drops the rest in C) and count
    # spaces, so the cut is "after the n-th space".
    depth = 0
    spaces = 0
    cut = -1
    for ch in _NOT_NESTING_OR_SPACE.sub("", head):
        if ch == " ":
            if depth == 0:
                cut = spaces
            spaces += 1
        elif ch == "<" or ch == "(":
            depth += 1
        else:
            depth -= 1
    return head.split(" ", cut + 1)[-1] + tail if cut >= 0 else name


def qualified_name(demangled: str) -> str:
    """The qualified function name without return type and parameters:
    `int Inference::Forward(int) const` -> `Inference::Forward`."""
    name, _ = _split_parameters(demangled)
    return _drop_return_type(name)


def _strip_templates(name: str) -> str:
    """`Foo<int>::bar<char>` -> `Foo::bar` (leaves `operator<` and friends alone)."""
    head, tail = _split_operator(name)
    if "<" not in head:
        return name
    pieces = []
    depth = 0
    kept_from = 0
    for match in _ANGLES.finditer(head):
        if match.group() == "<":
            if depth == 0:
                pieces.append(head[kept_from:match.start()])
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                kept_from = match.end()
    if depth == 0:
        pieces.append(head[kept_from:])
    return "".join(pieces) + tail


def _squash(text: str) -> str:
    """Drop the spaces that carry no meaning, so `f(int, char const*)` == `f(int,char const *)`."""
    return _MEANINGLESS_SPACE.sub("", " ".join(text.split()))


class _MatchKeys(NamedTuple):
    signatures: tuple[str, ...]  # squashed `[ret] name(params) [const]`, return type,
    # qualifiers and ABI tags optional
    names: tuple[str, ...]  # squashed qualified names: as is, no ABI tags, no templates
    display: str  # qualified name without ABI tags, for suggestions


def _is_lookup_name(demangled: str) -> bool:
    """False for names that were not demangled and for compiler-made fragments
    (`[clone .cold]`, `[clone .constprop.0]`): lookups and suggestions skip them."""
    return bool(demangled) and not demangled.startswith("_Z") and " [clone " not in demangled


def _display_name(demangled: str) -> str:
    """`_match_keys(demangled).display`, without working out the other keys."""
    return _strip_abi_tags(_drop_return_type(_split_parameters(demangled)[0]))


@functools.lru_cache(maxsize=1 << 16)
def _match_keys(demangled: str) -> _MatchKeys | None:
    """What a demangled function name can be looked up by; None where `_is_lookup_name` says
    so."""
    if not _is_lookup_name(demangled):
        return None
    name, params = _split_parameters(demangled)
    qualified = _drop_return_type(name)
    plain = _strip_abi_tags(qualified)
    names = {_squash(qualified), _squash(plain), _squash(_strip_templates(plain))}
    signatures = {_squash(demangled)}
    if params is not None:
        qualifiers = demangled[len(_strip_qualifiers(demangled)):]
        for written in {name, qualified, plain}:
            signatures.add(_squash(written + params))
            signatures.add(_squash(written + params + qualifiers))
    return _MatchKeys(tuple(signatures), tuple(names), plain)


def _last_identifier(text: str) -> str:
    identifiers = _IDENTIFIER.findall(_strip_templates(_strip_abi_tags(text)))
    return identifiers[-1] if identifiers else ""
