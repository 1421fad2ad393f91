"""One source for every layout: the C structs the core backend writes and the Python formats
the runtime reads come from the same IR type; clang must agree on sizes and offsets."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from probec.compiler.backends.manifest import field_ctype
from probec.compiler.ir.layout import struct_layout
from probec.compiler.ir.nodes import COMM, INT, SINT, ValueType


def test_layout_aligns_and_pads():
    lay = struct_layout("k", [("l_comm", COMM, "comm"), ("l_pid", INT, "pid"), ("l_ret", SINT, "ret")], bucket=True)
    names = [f.name for f in lay.fields]
    assert names[:4] == ["l_pid", "l_ret", "l_comm", "bucket"]
    assert lay.size % 8 == 0
    assert struct.calcsize(lay.pyformat) == lay.size
    for f in lay.fields:
        assert f.offset % (min(f.size, 8) if f.kind != "bytes" else 1) == 0


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_c_compiler_agrees(tmp_path):
    lay = struct_layout("k", [("l_comm", ValueType("str", length=13), "c"), ("l_x", INT, "x")], bucket=True,
                        header=[("event", "unsigned", 4, "I"), ("cpu", "unsigned", 4, "I")])
    members = "".join(f"  {field_ctype(f)} {f.name}{f'[{f.length}]' if f.length else ''};\n" for f in lay.fields)
    checks = "".join(f'  printf("%zu\\n", offsetof(struct k, {f.name}));\n' for f in lay.fields)
    src = tmp_path / "l.c"
    src.write_text("#include <stdio.h>\n#include <stddef.h>\n#include <linux/types.h>\n"
                   f"struct k {{\n{members}}};\nint main(void) {{\n{checks}  printf(\"%zu\\n\", sizeof(struct k));\n}}\n")
    subprocess.run(["cc", "-o", str(tmp_path / "l"), str(src)], check=True)
    out = [int(x) for x in subprocess.run([str(tmp_path / "l")], capture_output=True, text=True).stdout.split()]
    assert out == [f.offset for f in lay.fields] + [lay.size]
