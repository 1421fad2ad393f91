"""The one way text from outside the compiler reaches generated code, and the terminal.

Outside text is anything probec did not make itself: the spec file's name, spec strings
(description, help, filter literals), binary paths after resolution (symlinks, the spec's own
folder, ${VARIABLE}s, library look-ups), environment values, ELF symbol names. It is written into
a generated file only through the function below for that file's language; the templates reach
them as jinja filters of the same names (`{{ source | c_comment }}`), see
`backends.base.template_environment`. The manifest is JSON, written whole by `json.dumps`.

Names the spec loader checked against its identifier patterns (spec, metric, span, event and label
names, tracepoint, kernel function and USDT names) are identifiers by construction and are written
as they are.

Printable ASCII other than a backslash passes unchanged, so ordinary specs give the same bytes as
ever. Everything else is spelled as an escape (`\\n`, `\\x1b`, `\\u2028`; a byte that is not UTF-8,
which Python carries as a lone surrogate, as `\\xNN`) and so can never end the comment, line or
literal it sits in.
"""

from __future__ import annotations

import re

# bpftrace 0.17 lexes these in a probe address as they are (its `path` token, less `*` and `#`).
BPFTRACE_PLAIN = re.compile(r"[A-Za-z0-9_./-]+\Z")
# Printable ASCII that bpftrace 0.17 reads back unchanged inside a quoted probe address ('"' as
# '\"'). Not ':' (it splits the address even in quotes), '\' (unescaped twice), '*' '?' '[' ']'
# (wildcards), '$' ($1 is a positional parameter).
BPFTRACE_QUOTABLE = re.compile(r"[ !\"#%&'()+,\-./0-9;<=>@A-Z^_`a-z{|}~]+\Z")


def _escape(ch: str) -> str:
    o = ord(ch)
    if ch == "\\":
        return "\\\\"
    if 0xDC80 <= o <= 0xDCFF:          # os.fsdecode's stand-in for a byte that is not UTF-8
        return f"\\x{o - 0xDC00:02x}"
    if o < 0x100:
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch, f"\\x{o:02x}")
    return f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def visible(text: str) -> str:
    """`text` as one line of printable ASCII: a backslash and every other character escaped."""
    return "".join(ch if " " <= ch <= "~" and ch != "\\" else _escape(ch) for ch in text)


def one_line(text: str) -> str:
    """`text` for a terminal line: what is not printable (line breaks, escape sequences, bytes
    that are not UTF-8) escaped; other Unicode kept."""
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _string_literal(data: bytes, backslashed: str, other) -> str:
    """`data` between double quotes: the characters in `backslashed` after a backslash, other
    printable ASCII as it is, every other byte as `other(byte)` spells it."""
    out = []
    for b in data:
        ch = chr(b)
        if ch in backslashed:
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append(other(b))
    return '"' + "".join(out) + '"'


# -- C --------------------------------------------------------------------------------------------
def c_comment(text: str) -> str:
    """Text inside /* */: cannot close the comment or open a nested one (clang -Wcomment)."""
    return visible(text).replace("*/", "*\\/").replace("/*", "/\\*")


def c_string(text: str) -> str:
    """A C string literal; other than printable ASCII, bytes as three-digit octal escapes
    ('?' escaped too: no trigraph can form)."""
    return _string_literal(text.encode("utf-8", "surrogateescape"), '"\\?', lambda b: f"\\{b:03o}")


# -- Python ---------------------------------------------------------------------------------------
def python_comment(text: str) -> str:
    """Text after `#` on one line. `coding:`/`coding=` is broken up: in the first two lines of a
    file it would be read as the file's encoding (PEP 263), and an unknown one stops Python."""
    return re.sub(r"coding([:=])", lambda m: f"coding\\x{ord(m.group(1)):02x}", visible(text))


def python_text(text: str) -> str:
    """A Python string literal of several lines (the bcc backend's C program): between triple
    quotes, line breaks and tabs kept; a backslash, every double quote (so no closing triple quote
    can form) and every other character that is not printable ASCII escaped."""
    out = []
    for ch in text:
        if ch in "\n\t" or (" " <= ch <= "~" and ch not in "\\\""):
            out.append(ch)
        elif ch == '"':
            out.append('\\"')
        else:
            out.append(_escape(ch))
    return '"""' + "".join(out) + '"""'


# -- bpftrace -------------------------------------------------------------------------------------
def bpftrace_comment(text: str) -> str:
    """Text after `//` on one line."""
    return visible(text)


def bpftrace_string(data: bytes) -> str:
    """A bpftrace string literal (spec strings are printable ASCII, checked in typing; the rest
    is escaped all the same)."""
    return _string_literal(data, '"\\', lambda b: f"\\x{b:02x}")


def bpftrace_address_part(text: str) -> str | None:
    """A path or symbol as one part of a bpftrace probe address: as it is where bpftrace 0.17
    reads it so, quoted where only quotes let it, None where bpftrace 0.17 cannot name it."""
    if BPFTRACE_PLAIN.match(text):
        return text
    if BPFTRACE_QUOTABLE.match(text):
        return '"' + text.replace('"', '\\"') + '"'
    return None


# -- GitHub Actions workflow commands (probec check --format github) ----------------------------
def github_data(text: str) -> str:
    """The message of a `::error ...::MESSAGE` line: '%', CR and LF escaped as the runner reads them."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def github_property(text: str) -> str:
    """A `key=VALUE` of a workflow command: as the message, and ':' and ',' too."""
    return github_data(text).replace(":", "%3A").replace(",", "%2C")
