"""What every backend shares: the bundle it writes, templates, and the 'unsupported' diagnostic."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import jinja2

from .. import escaping
from ..diagnostics import Diagnostics, SourceSpan
from ..ir.nodes import Program, TracepointField, walk
from ..kinds import METRIC_KINDS
from .manifest import Manifest, manifest_for


@dataclass
class Bundle:
    """Files a backend produced, by name, plus the manifest the runtime reads."""
    name: str
    backend: str
    files: dict[str, bytes] = field(default_factory=dict)
    manifest: Manifest | None = None

    def write(self, directory: str | Path) -> list[Path]:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, data in sorted(self.files.items()):
            path = out / name
            path.write_bytes(data)
            if name.endswith(".py"):
                path.chmod(0o755)
            written.append(path)
        path = out / "manifest.json"
        path.write_text(self.manifest.to_json())
        written.append(path)
        return written


class Backend:
    """A backend turns a Program into a Bundle. Subclasses set `name` and declare what they can
    do: `PROBES` says how they render each probe kind of compiler/kinds.py and `UPDATES` each way
    a metric kind is updated (MetricKind.update: a backend adds to a counter and to a gauge alike;
    what the value means is the runtime's business), and `FIELD_OFFSETS` whether they need the
    offsets of the tracepoint fields they read (a sentence saying why, or ""). A kind missing
    from a table is one the backend cannot do."""

    name = ""
    PROBES: Mapping[str, object] = {}
    UPDATES: Mapping[str, object] = {}
    FIELD_OFFSETS = ""

    def __init__(self, diags: Diagnostics, spec_span: SourceSpan | None = None):
        self.d = diags
        self.spec_span = spec_span

    def cannot(self, what: str, where: str, why: str, span: SourceSpan | None) -> None:
        self.d.error("E501", f"the {self.name} backend cannot do {what} ({where}): {why}", span or self.spec_span)

    def supports(self, program: Program) -> bool:
        """Report, from what this backend declares, everything in `program` it cannot do (E501),
        before it writes anything. True when it can build the whole program."""
        before = self.d.error_count
        for p in program.probes:
            where = p.spec_text or p.id
            if p.kind not in self.PROBES:
                self.cannot(f"{p.kind} probes", where, f"it attaches {', '.join(sorted(self.PROBES))}", p.span)
                continue
            if self.FIELD_OFFSETS:
                unknown = {n.name for n in walk(p.actions) if isinstance(n, TracepointField) and n.offset < 0}
                for name in sorted(unknown):
                    self.cannot("tracepoint fields with unknown offsets", f"{where}: args.{name}", self.FIELD_OFFSETS,
                                p.span)
        for m in program.metrics:
            update = METRIC_KINDS[m.kind].update
            if update not in self.UPDATES:
                self.cannot(f"{m.kind} metrics", f"metric '{m.name}'", f"they are updated by '{update}', and it "
                            f"renders only {', '.join(sorted(self.UPDATES))}", None)
        return self.d.error_count == before

    def build(self, program: Program) -> Bundle:
        raise NotImplementedError

    def base_manifest(self, program: Program, files: dict[str, str], **sections) -> Manifest:
        return manifest_for(program, self.name, files, **sections)

    @staticmethod
    def generated_names(kind: str, name: str, histogram: bool = False) -> tuple[str, ...]:
        """The identifiers this backend makes from a span, metric or event's name."""
        return ()


def check_generated_names(spec, diags: Diagnostics) -> None:
    """Two spec names must not make one identifier in any backend (a bpftrace map, a C struct or
    global): the second would silently share the first one's storage, or fail to compile."""
    from .bcc.generator import BccBackend
    from .bpftrace.generator import BpftraceBackend
    from .core.generator import CoreBackend
    items = [("span", n, s.span, False) for n, s in spec.spans.items()] + \
        [("metric", n, m.span, METRIC_KINDS[m.kind].buckets) for n, m in spec.metrics.items()] + \
        [("event", n, e.span, False) for n, e in spec.events.items()]
    for backend in (BpftraceBackend, CoreBackend, BccBackend):
        owner: dict[str, tuple[str, str]] = {}
        for kind, name, span, histogram in items:
            names = backend.generated_names(kind, name, histogram)
            clash = next((n for n in names if n in owner and owner[n] != (kind, name)), None)
            if clash is not None:
                okind, oname = owner[clash]
                diags.error("E135", f"{kind} '{name}' and {okind} '{oname}' would both be '{clash}' in the "
                            f"{backend.name} backend's output", span, f"rename one of them")
                break
            owner.update((n, (kind, name)) for n in names)


# Outside text enters a template only through one of these (see compiler/escaping.py).
TEMPLATE_FILTERS = {name: getattr(escaping, name) for name in
                    ("c_comment", "c_string", "python_comment", "python_text", "bpftrace_comment")}


def template_environment(backend: str, *shared: str) -> jinja2.Environment:
    """Templates of `backend`, then of the backends in `shared` whose templates it reuses."""
    folders = [str(resources.files("probec.templates").joinpath(name)) for name in (backend, *shared)]
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(folders),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters.update(TEMPLATE_FILTERS)
    return env
