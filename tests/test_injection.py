"""Outside text never becomes code: hostile spec file names, binary paths that resolve into hostile
folders (a symlink, the spec's own folder, ${VARIABLE}, a name found on $PATH), ELF symbol names,
and hostile strings inside a spec, all through the real CLI, for every backend.

Each generated file is compared with the one a benign spelling of the same spec gives: the core
object must be byte-identical (clang compiled the same program), loader.py must parse to the same
Python, and the bpftrace script may differ only inside its `//` comments or, for a path that
bpftrace can name, in that one quoted path. Where a target cannot name a path safely, the build
must end in a diagnostic with file:line:col and a stable code, never a traceback.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, WORKLOADS, probec, require_kernel

MARKER = "PWNED"
PY_PAYLOAD = f"__import__('pathlib').Path('{MARKER}').touch()"

# Spec file names (the part before .yaml). Non-UTF-8 bytes come through os.fsdecode, as argv does.
HOSTILE_NAMES = {
    "newline_python": f"a\n{PY_PAYLOAD}\n#",
    "carriage_return": f"a\r{PY_PAYLOAD}\r#",
    "triple_quote": f'a"""\n{PY_PAYLOAD}\n"""',
    "c_comment_end": "a* int probec_injected = 1; *",      # a file name cannot hold '/'
    "bpftrace_probe": "a\ntracepoint:syscalls:sys_enter_getpid { @forged = count(); }\n",
    "braces": "a{ } }",
    "shell": f"$(touch {MARKER})`touch {MARKER}`",
    "backslash_end": "a\\",
    "quotes": "a\"b'c",
    "python_coding": "coding:bogus",
    "form_feed_and_unicode_breaks": "a\x0c\u2028\u0085b",
    "trigraphs": "a??=??'??-",
    "non_utf8": os.fsdecode(b"a\xff\xfe\n" + PY_PAYLOAD.encode() + b"\n#"),
}

SPEC = """\
name: inj
description: "@DESC@"
metrics:
  inj_getpid_total:
    help: "@HELP@"
    count: syscall:getpid
    filter: comm != "@STR@"
    labels: [comm]
"""
BENIGN = {"@DESC@": "calls", "@HELP@": "calls", "@STR@": "x"}


def spec_text(values: dict[str, str] = BENIGN) -> str:
    text = SPEC
    for k, v in values.items():
        text = text.replace(k, v)
    return text


def clang_ready() -> bool:
    """Whether core builds compile here (clang, and bpftool or a vmlinux.h). Without them the
    object comparisons are left out; CI must have them."""
    ready = shutil.which("clang") is not None and (
        shutil.which("bpftool") is not None or bool(os.environ.get("PROBEC_VMLINUX_H")))
    if not ready and os.environ.get("CI") == "true":
        pytest.fail("clang and bpftool are needed to compile the core builds under CI")
    return ready


def build(spec: Path, backend: str, out: Path, env: dict | None = None):
    r = probec("build", str(spec), "--backend", backend, "-o", str(out), "--bpftrace-version", "0.17",
               env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    assert "Traceback" not in r.stderr, r.stderr
    return r


def code_lines(script: str) -> list[str]:
    """The bpftrace script without its // comment lines."""
    return [line for line in script.split("\n") if not line.startswith("//")]


def object_sections(path: Path) -> dict[str, bytes]:
    """Every section of a BPF object but .debug_line, which holds the MD5 of the C source (and so
    of its comments): the programs, maps, BTF with its line info, and the rest of DWARF."""
    from probec.host.elf import ElfFile
    f = ElfFile(path)
    return {s.name: f.section_data(s) for s in f.sections if s.name != ".debug_line"}


def assert_inert_comments(text: str) -> None:
    """Every line is printable ASCII: no outside character ended a comment or a line."""
    for line in text.split("\n"):
        assert all(0x20 <= ord(c) < 0x7F or c == "\t" for c in line), repr(line)


# --- the spec file's name ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def benign_builds(tmp_path_factory):
    base = tmp_path_factory.mktemp("benign")
    spec = base / "benign.yaml"
    spec.write_text(spec_text())
    compile_core = clang_ready()
    outs = {}
    for backend in ("bpftrace", "core", "bcc"):
        r = build(spec, backend, base / backend)
        assert r.returncode == 0, r.stderr
        outs[backend] = base / backend
    return outs, compile_core


@pytest.mark.parametrize("case", sorted(HOSTILE_NAMES))
def test_hostile_spec_file_names_stay_in_their_comments(case, tmp_path, benign_builds):
    benign, compiled = benign_builds
    spec = tmp_path / (HOSTILE_NAMES[case] + ".yaml")
    spec.write_text(spec_text())

    bt = build(spec, "bpftrace", tmp_path / "bt")
    assert bt.returncode == 0, bt.stderr
    script = (tmp_path / "bt" / "inj.bt").read_text()
    assert_inert_comments(script)
    assert code_lines(script) == code_lines((benign["bpftrace"] / "inj.bt").read_text())
    manifest = json.loads((tmp_path / "bt" / "manifest.json").read_text())
    assert manifest["spec"] == spec.name                     # JSON carries it whole

    core = build(spec, "core", tmp_path / "core")
    assert core.returncode == 0, core.stderr
    for name in ("inj.bpf.c", "inj.h", "loader.py"):
        text = (tmp_path / "core" / name).read_text()
        assert_inert_comments(text)
        assert text.count("\n") == (benign["core"] / name).read_text().count("\n"), name
    loader = (tmp_path / "core" / "loader.py").read_text()
    assert ast.dump(ast.parse(loader)) == ast.dump(ast.parse((benign["core"] / "loader.py").read_text()))
    run = subprocess.run([sys.executable, str(tmp_path / "core" / "loader.py"), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0 and "usage:" in run.stdout, run.stderr
    assert not (tmp_path / MARKER).exists()
    if compiled:
        # clang compiled the program a benign name gives: no extra statement, every line where it was
        assert object_sections(tmp_path / "core" / "inj.bpf.o") == object_sections(benign["core"] / "inj.bpf.o")

    bcc = build(spec, "bcc", tmp_path / "bcc")
    assert bcc.returncode == 0, bcc.stderr
    program = (tmp_path / "bcc" / "inj.py").read_text()
    assert_inert_comments(program)
    c, benign_c = bcc_program_c(tmp_path / "bcc" / "inj.py"), bcc_program_c(benign["bcc"] / "inj.py")
    assert_inert_comments(c)
    assert c.count("\n") == benign_c.count("\n")
    # the C differs only in its comments, which name the spec file
    assert [line for line in c.split("\n") if "Generated by probec" not in line] == \
        [line for line in benign_c.split("\n") if "Generated by probec" not in line]
    run = subprocess.run([sys.executable, str(tmp_path / "bcc" / "inj.py"), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0 and "usage:" in run.stdout, run.stderr
    assert not (tmp_path / MARKER).exists()


def bcc_program_c(path: Path) -> str:
    """The C a bcc program holds, and that its statements are the benign ones: a docstring, two
    imports, PROGRAM = one string, and the `if __name__` block."""
    tree = ast.parse(path.read_text())
    kinds = [type(node).__name__ for node in tree.body]
    assert kinds == ["Expr", "Import", "Import", "Assign", "If"], kinds
    value = tree.body[3].value
    assert isinstance(value, ast.Constant) and isinstance(value.value, str)
    return value.value


# --- the escaping functions themselves, with what no file name can hold -------------------------
ESCAPED = [*HOSTILE_NAMES.values(), "*/ int probec_injected = 1; /*", "a*\\\n/ int probec_injected; /*",
           "x\\", "\u202e\U0001f600", "coding=utf-7 +AAo-x"]


@pytest.mark.parametrize("text", ESCAPED)
def test_escaped_text_cannot_leave_its_comment(text):
    from probec.compiler import escaping
    for out in (escaping.c_comment(text), escaping.python_comment(text), escaping.bpftrace_comment(text)):
        assert all(" " <= c <= "~" for c in out), out
    c = escaping.c_comment(text)
    assert "*/" not in c and "/*" not in c
    python = f"#!/usr/bin/env python3\n# {escaping.python_comment(text)}\nx = 1\n"
    assert ast.dump(ast.parse(python.encode())) == ast.dump(ast.parse("x = 1"))
    assert not any(c in escaping.one_line(text) for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
    literal = escaping.c_string(text)        # a C literal that holds exactly the text's bytes
    assert re.fullmatch(r'"(?:[^"\\]|\\[0-7]{3}|\\["\\?])*"', literal), literal
    decoded = re.sub(rb"\\([0-7]{3}|.)", lambda m: bytes([int(m.group(1), 8)]) if len(m.group(1)) == 3
                     else m.group(1), literal[1:-1].encode())
    assert decoded == text.encode("utf-8", "surrogateescape")
    program = f"PROGRAM = {escaping.python_text(text)}\nx = 1\n"   # the bcc program's C, as one literal
    tree = ast.parse(program.encode())
    assert [type(n).__name__ for n in tree.body] == ["Assign", "Assign"]
    held = tree.body[0].value.value
    assert held == "".join(chr(ord(c) - 0xDC00) if 0xDC80 <= ord(c) <= 0xDCFF else c for c in text)


# --- strings inside the spec -------------------------------------------------------------------
HOSTILE_TEXT = 'x"); system("id"); /* */ } { $(id) `id` \\ """ %s %n\n@forged = count();\n'


def test_description_and_help_reach_only_the_manifest(tmp_path, benign_builds):
    benign, compiled = benign_builds
    spec = tmp_path / "benign.yaml"
    text = spec_text({"@DESC@": json.dumps(HOSTILE_TEXT)[1:-1], "@HELP@": json.dumps(HOSTILE_TEXT)[1:-1],
                      "@STR@": "x"})
    spec.write_text(text)
    for backend in ("bpftrace", "core", "bcc"):
        r = build(spec, backend, tmp_path / backend)
        assert r.returncode == 0, r.stderr
        for f in (tmp_path / backend).iterdir():
            if f.name != "manifest.json":
                assert f.read_bytes() == (benign[backend] / f.name).read_bytes(), f.name
        manifest = json.loads((tmp_path / backend / "manifest.json").read_text())
        assert manifest["description"] == HOSTILE_TEXT
        assert manifest["metrics"][0]["help"] == HOSTILE_TEXT


@pytest.mark.parametrize("literal", ['a\\"b', "*/x/*", "{ }", "$(id)", "a\\\\", '\\"\\"\\"', "%s%n", "??="])
def test_filter_strings_are_literals_in_both_backends(literal, tmp_path, benign_builds):
    benign, compiled = benign_builds
    spec = tmp_path / "benign.yaml"
    spec.write_text(spec_text({**BENIGN, "@STR@": literal}))
    bt = build(spec, "bpftrace", tmp_path / "bt")
    assert bt.returncode == 0, bt.stderr
    script = (tmp_path / "bt" / "inj.bt").read_text()
    old, new = code_lines((benign["bpftrace"] / "inj.bt").read_text()), code_lines(script)
    changed = [(a, b) for a, b in zip(old, new) if a != b]
    assert len(old) == len(new) and len(changed) == 1, changed
    value = literal.encode().decode("unicode_escape")     # what the spec's string holds
    quoted = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    assert changed[0][1] == changed[0][0].replace('"x"', quoted)
    core = build(spec, "core", tmp_path / "core")
    assert core.returncode == 0, core.stderr
    old, new = (benign["core"] / "inj.bpf.c").read_text().split("\n"), \
        (tmp_path / "core" / "inj.bpf.c").read_text().split("\n")
    changed = [(a, b) for a, b in zip(old, new) if a != b]
    as_bytes = ", ".join(f"{b:#04x}" for b in value.encode() + b"\0")
    assert len(old) == len(new) and len(changed) == 2, changed
    assert changed[0][1] == f"const unsigned char probec_str_0[{len(value) + 1}] = {{ {as_bytes} }};"
    assert changed[1][1] == changed[1][0].replace("probec_str_0, 2)", f"probec_str_0, {len(value) + 1})")
    if compiled:
        assert (tmp_path / "core" / "inj.bpf.o").exists()
    bcc = build(spec, "bcc", tmp_path / "bcc")
    assert bcc.returncode == 0, bcc.stderr
    old, new = bcc_program_c(benign["bcc"] / "inj.py").split("\n"), bcc_program_c(tmp_path / "bcc" / "inj.py").split("\n")
    changed = [(a, b) for a, b in zip(old, new) if a != b]
    assert len(old) == len(new) and len(changed) == 2, changed
    assert changed[0][1] == f"#define probec_str_0 ((const unsigned char[{len(value) + 1}]){{ {as_bytes} }})"
    assert changed[1][1] == changed[1][0].replace("probec_str_0, 2)", f"probec_str_0, {len(value) + 1})")


# --- binary paths after resolution -------------------------------------------------------------
# folder name -> how the bpftrace backend writes a path through it: plain, quoted, or refused
HOSTILE_FOLDERS = {
    "plain": "plain",
    "forged_probe": "refused",         # name: newline + a probe + newline
    "space": "quoted",
    "plus_at": "quoted",               # libstdc++.so: bpftrace 0.17 cannot lex '+' unquoted
    "double_quote": "quoted",
    "braces_and_comma": "quoted",
    "colon": "refused",
    "dollar": "refused",
    "glob": "refused",
    "backslash": "refused",
    "non_ascii": "refused",
    "non_utf8": "refused",
}
FOLDER_NAMES = {
    "plain": "plain",
    "forged_probe": "x:pwork_record\ntracepoint:syscalls:sys_enter_getpid { @forged = count(); }\nuprobe:",
    "space": "sp ace",
    "plus_at": "lib+c@x",
    "double_quote": 'dq"x""" y',
    "braces_and_comma": "b{ @x = count(); },c",
    "colon": "co:lon",
    "dollar": f"$1$(touch {MARKER})",
    "glob": "st*r?[a]",
    "backslash": "b\\\\\"c",
    "non_ascii": "caf\u00e9",
    "non_utf8": os.fsdecode(b"x\xff"),
}

ROUTES = ("symlink", "spec_folder", "env_variable", "path_lookup")


def route_setup(route: str, base: Path, folder: Path) -> tuple[Path, dict, str]:
    """(spec file, environment, the binary the probe lands in) for one way of naming `folder`."""
    shutil.copy(WORKLOADS / "libpwork.so", folder / "libpwork.so")
    shutil.copy(WORKLOADS / "pwork", folder / "pwork")
    env: dict = {}
    target = folder / "libpwork.so"
    if route == "symlink":
        (base / "link.so").symlink_to(target)
        spec, probe = base / "spec.yaml", "uprobe:./link.so:pwork_record"
        binaries = ""
    elif route == "spec_folder":
        spec, probe, binaries = folder / "spec.yaml", "uprobe:lib:pwork_record", "binaries:\n  lib: ./libpwork.so\n"
    elif route == "env_variable":
        (base / "libdir").symlink_to(folder)
        env["PROBEC_TEST_LIBDIR"] = str(base / "libdir")
        spec, probe = base / "spec.yaml", "uprobe:lib:pwork_record"
        binaries = "binaries:\n  lib: ${PROBEC_TEST_LIBDIR}/libpwork.so\n"
    else:
        (base / "bin").symlink_to(folder)      # ':' cannot be in $PATH itself; realpath finds it
        env["PATH"] = str(base / "bin") + os.pathsep + os.environ.get("PATH", "")
        spec, probe, binaries = base / "spec.yaml", "usdt:w:pwork:tick", "binaries:\n  w: pwork\n"
        target = folder / "pwork"
    spec.write_text(f"name: resolved\n{binaries}metrics:\n  resolved_calls_total:\n    count: {probe}\n")
    return spec, env, target


def route_build(route: str, base: Path, name: str, backend: str):
    folder = base / name
    folder.mkdir(parents=True)
    spec, env, target = route_setup(route, base, folder)
    r = build(spec, backend, base / "out", env=env)
    return r, spec, target


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", sorted(HOSTILE_FOLDERS))
def test_resolved_paths_are_quoted_or_refused_for_bpftrace(route, case, tmp_path, workloads):
    plain, _, plain_target = route_build(route, tmp_path / "plain", "plain", "bpftrace")
    assert plain.returncode == 0, plain.stderr
    r, spec, target = route_build(route, tmp_path / "hostile", FOLDER_NAMES[case], "bpftrace")
    expected = HOSTILE_FOLDERS[case]
    if expected == "refused":
        assert r.returncode == 1
        spec_line = [line for line in r.stderr.splitlines() if "error[" in line]
        assert spec_line and all(re.match(r".*spec\.yaml:\d+:\d+: error\[E503\]: ", line) for line in spec_line), \
            r.stderr
        for line in r.stderr.splitlines():     # the path is shown escaped, on the diagnostic's line
            assert re.match(r".*spec\.yaml:\d+:\d+: error|\s*\d* \| |  help: ", line), line
        assert not (tmp_path / "hostile" / "out").exists()
        return
    assert r.returncode == 0, r.stderr
    script = (tmp_path / "hostile" / "out" / "resolved.bt").read_text()
    old = code_lines((tmp_path / "plain" / "out" / "resolved.bt").read_text())
    new = code_lines(script)
    changed = [(a, b) for a, b in zip(old, new) if a != b]
    assert len(old) == len(new) and len(changed) == 1, changed
    path = os.path.realpath(target)
    written = '"' + path.replace('"', '\\"') + '"' if expected == "quoted" else path
    assert changed[0][1] == changed[0][0].replace(os.path.realpath(plain_target), written)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", ["forged_probe", "colon", "backslash", "non_utf8", "dollar", "braces_and_comma",
                                  "double_quote"])
@pytest.mark.parametrize("backend", ["core", "bcc"])
def test_resolved_paths_reach_core_and_bcc_only_through_the_manifest(route, case, backend, tmp_path, workloads):
    """Core and bcc pass any path to libbpf or BCC from the manifest, but check refuses what the
    bpftrace backend cannot name: whatever check accepts, every backend builds."""
    plain, _, _ = route_build(route, tmp_path / "plain", "plain", backend)
    assert plain.returncode == 0, plain.stderr
    r, spec, target = route_build(route, tmp_path / "hostile", FOLDER_NAMES[case], backend)
    if HOSTILE_FOLDERS[case] == "refused":
        assert r.returncode == 1 and re.search(r"spec\.yaml:\d+:\d+: error\[E503\]", r.stderr), r.stderr
        assert not (tmp_path / "hostile" / "out").exists()
        return
    assert r.returncode == 0, r.stderr
    out, ref = tmp_path / "hostile" / "out", tmp_path / "plain" / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["probes"][0]["binary"] == os.path.realpath(target)
    for f in out.iterdir():
        if f.name != "manifest.json":
            assert f.read_bytes() == (ref / f.name).read_bytes(), f.name


def test_an_environment_value_is_checked_after_expansion(tmp_path, workloads):
    folder = tmp_path / FOLDER_NAMES["forged_probe"]
    folder.mkdir()
    shutil.copy(WORKLOADS / "libpwork.so", folder / "libpwork.so")
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: resolved\nbinaries:\n  lib: ${PROBEC_TEST_LIBDIR}/libpwork.so\n"
                    "metrics:\n  resolved_calls_total:\n    count: uprobe:lib:pwork_record\n")
    for backend in ("bpftrace", "core"):
        r = build(spec, backend, tmp_path / backend, env={"PROBEC_TEST_LIBDIR": str(folder)})
        assert r.returncode == 1 and re.search(r"spec\.yaml:3:8: error\[E111\]", r.stderr), r.stderr
        assert "\ntracepoint:" not in r.stderr     # the diagnostic shows the path on its own line


def test_an_elf_symbol_bpftrace_cannot_name_is_refused(tmp_path, workloads):
    if shutil.which("objcopy") is None:
        pytest.skip("objcopy is not installed")
    lib = tmp_path / "libsym.so"
    subprocess.run(["objcopy", "--redefine-sym", "pwork_record=pwork$record", str(WORKLOADS / "libpwork.so"),
                    str(lib)], check=True)
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: sym\nmetrics:\n  sym_calls_total:\n    count: uprobe:./libsym.so:pwork$record\n")
    r = build(spec, "bpftrace", tmp_path / "bt")
    assert r.returncode == 1 and re.search(r"spec\.yaml:4:12: error\[E503\]", r.stderr), r.stderr
    r = build(spec, "core", tmp_path / "core")            # refused by check, for every backend
    assert r.returncode == 1 and re.search(r"spec\.yaml:4:12: error\[E503\]", r.stderr), r.stderr
    r = probec("check", str(spec))
    assert r.returncode == 1 and "error[E503]" in r.stderr, r.stderr


# --- bpftrace itself reads what was written ----------------------------------------------------
def bpftrace_probes(script: Path) -> list[str]:
    """The attach points bpftrace parsed from `script` (a dry run: -d prints the AST, loads nothing)."""
    r = subprocess.run(["bpftrace", "-d", str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    ast_text = r.stdout.split("AST after: parser")[1].split("AST after:")[0]
    return [line[1:] for line in ast_text.splitlines() if re.match(r" [^ ]", line)]


@pytest.mark.kernel
def test_bpftrace_parses_hostile_names_as_written(tmp_path, workloads):
    require_kernel(need_bpftrace=True)
    benign = tmp_path / "benign.yaml"
    benign.write_text(spec_text())
    assert build(benign, "bpftrace", tmp_path / "benign").returncode == 0
    expected = bpftrace_probes(tmp_path / "benign" / "inj.bt")
    for case, name in HOSTILE_NAMES.items():
        spec = tmp_path / case / (name + ".yaml")
        spec.parent.mkdir()
        spec.write_text(spec_text())
        assert build(spec, "bpftrace", tmp_path / case / "out").returncode == 0
        assert bpftrace_probes(tmp_path / case / "out" / "inj.bt") == expected, case
    for case, how in HOSTILE_FOLDERS.items():
        if how == "refused":
            continue
        base = tmp_path / f"path_{case}"
        r, spec, target = route_build("symlink", base, FOLDER_NAMES[case], "bpftrace")
        assert r.returncode == 0, r.stderr
        probes = bpftrace_probes(base / "out" / "resolved.bt")
        # BEGIN (declares the cgroup map), the probe, the ready mark, the dump, END
        assert probes[0] == "BEGIN" and probes[-1] == "END" and len(probes) == 5, probes
        assert probes[1] == f"uprobe:{os.path.realpath(target)}:pwork_record", probes
