"""The compiler's entry points: check a spec, build a bundle. The CLI is a thin layer over these."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..host.features import tool_version
from .backends.base import check_generated_names
from .diagnostics import Diagnostics
from .ir.host import HostInfo
from .ir.lowering import LoweringOptions, lower
from .ir.nodes import Program
from .spec.loader import load_spec_file
from .spec.model import Spec


@dataclass
class CheckResult:
    path: str
    diagnostics: Diagnostics
    source: str
    spec: Spec | None = None
    program: Program | None = None
    sources: dict[str, str] = field(default_factory=dict)


def check_file(path: str, host: HostInfo | None = None, kernel: str = "host", backend: str = "") -> CheckResult:
    """Load, type and lower a spec. With `backend`, the mechanisms a backend chooses among at build
    time (bpftrace's kernel: span variants) are those that backend can attach here."""
    diags = Diagnostics()
    spec, text = load_spec_file(path, diags)
    result = CheckResult(path, diags, text, spec, sources={path: text})
    if spec is None or diags.has_errors():
        return result
    check_generated_names(spec, diags)
    if diags.has_errors():
        return result
    options = LoweringOptions(host=host or HostInfo(), kernel=kernel, backend=backend)
    result.program = lower(spec, diags, options)
    return result


def bpftrace_version() -> tuple[int, int] | None:
    from .backends.bpftrace.generator import parse_version
    text = tool_version("bpftrace")
    return parse_version(text) if text else None


def build_bundle(result: CheckResult, backend: str, target_version: str | None = None, **options):
    """Run a backend over a checked program. Returns the Bundle, or None with diagnostics added."""
    program = result.program
    assert program is not None
    if backend == "bpftrace":
        from .backends.bpftrace.generator import BpftraceBackend, parse_version
        version = parse_version(target_version) if target_version else bpftrace_version()
        if version is None:
            version = (0, 17)
            result.diagnostics.warning("W503", "bpftrace is not installed here; writing for bpftrace 0.17 "
                                       "(pass --bpftrace-version to target another)", None)
        gen = BpftraceBackend(result.diagnostics, version, **options)
    elif backend == "core":
        from .backends.core.generator import CoreBackend
        gen = CoreBackend(result.diagnostics, **options)
    elif backend == "bcc":
        from .backends.bcc.generator import BccBackend
        gen = BccBackend(result.diagnostics, **options)
    else:
        raise ValueError(backend)
    if not gen.supports(program):
        return None
    bundle = gen.build(program)
    if result.diagnostics.has_errors():
        return None
    return bundle
