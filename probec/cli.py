"""The `probec` command: check, build, run, promote, doctor, rules, dashboard.

`run` imports only the runtime, so a production host needs no compiler dependencies.
"""

from __future__ import annotations

import argparse
import os
import sys

from .runtime.options import add_run_arguments

EXIT_OK, EXIT_ERRORS, EXIT_USAGE = 0, 1, 2
BACKENDS = ("bpftrace", "core", "bcc")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors exit 2, as documented
        self.print_usage(sys.stderr)
        print(f"probec: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="probec", description="Declarative eBPF probes for model serving.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("check", help="validate specs without loading anything (no root needed)")
    c.add_argument("specs", nargs="+", metavar="SPEC")
    c.add_argument("--format", choices=("text", "json", "github", "sarif"), default="text",
                   help="json: a list of diagnostics; github: GitHub Actions annotations; sarif: SARIF 2.1.0")
    c.add_argument("--kernel", choices=("host", "any"), default="host",
                   help="host: probe mechanisms must exist on this kernel (default); any: do not check them")
    c.add_argument("--no-host", action="store_true",
                   help="skip every check that reads this machine (tracefs, binaries, kernel symbols)")
    c.add_argument("--werror", action="store_true", help="treat warnings as errors")
    c.add_argument("--target", metavar="FACTS",
                   help="check the kernel side against another machine's facts, recorded there with "
                        "'probec doctor --format json > FACTS' (binaries are still read here)")
    c.add_argument("--backend", choices=BACKENDS, default=None,
                   help="also check what this backend can do with the spec (bcc: whether this host's "
                        "kernel headers are the running kernel's)")

    b = sub.add_parser("build", help="render a spec for a backend")
    b.add_argument("spec", metavar="SPEC")
    b.add_argument("--backend", choices=BACKENDS, default="bpftrace")
    b.add_argument("-o", "--output", metavar="DIR", help="bundle folder (default: ./NAME.BACKEND)")
    b.add_argument("--kernel", choices=("host", "any"), default="host")
    b.add_argument("--target", metavar="FACTS",
                   help="build for another machine's kernel, recorded there with 'probec doctor --format json "
                        "> FACTS': tracepoint field offsets and mechanisms come from the record (binaries are "
                        "still read here)")
    b.add_argument("--bpftrace-version", metavar="X.Y", help="bpftrace release to write for (default: installed)")
    b.add_argument("--interval", type=float, default=1.0, help="seconds between bpftrace map dumps (default 1)")
    b.add_argument("--no-compile", action="store_true", help="core: write C only, do not run clang")
    b.add_argument("--begin-map", choices=("auto", "task", "hash"), default="auto",
                   help="core: where thread-keyed spans keep begin times: auto (or task): task-local storage "
                        "where the kernel loading the bundle has it (5.11+, cheapest), else a HASH map sized "
                        "by limits.concurrency, chosen at load; hash: always the HASH map")

    r = sub.add_parser("run", help="load bundles (or build specs) and export Prometheus metrics")
    r.add_argument("target", metavar="BUNDLE|SPEC|FOLDER", nargs="+",
                   help="one spec or bundle; or several, or a folder of them, run together on one port and "
                        "reloaded on SIGHUP or when the folder changes")
    r.add_argument("--backend", choices=BACKENDS, default=None,
                   help="when TARGET is a spec: build it for this backend first (default bpftrace)")
    add_run_arguments(r)

    t = sub.add_parser("btf", help="cut the minimal BTF a core bundle needs, for hosts without /sys/kernel/btf/vmlinux "
                                   "('probec run --btf FILE' there)")
    t.add_argument("bundle", metavar="BUNDLE")
    t.add_argument("-o", "--output", metavar="FILE", required=True, help="where to write the BTF")
    t.add_argument("--from", dest="source", metavar="BTF", default="/sys/kernel/btf/vmlinux",
                   help="the target kernel's full BTF, e.g. from its vmlinux or a BTFHub archive "
                        "(default: this kernel's, /sys/kernel/btf/vmlinux)")

    for name, what, default in (("rules", "write Prometheus recording and alerting rules for a spec's collector",
                                  "stdout"),
                                 ("dashboard", "write a Grafana dashboard (JSON) for a spec's collector", "stdout")):
        m = sub.add_parser(name, help=what)
        m.add_argument("spec", metavar="SPEC")
        m.add_argument("-o", "--output", metavar="FILE", help=f"where to write (default: {default})")
        m.add_argument("--job", metavar="JOB", help="the Prometheus scrape job of the collector (default: the spec's name)")

    pr = sub.add_parser("promote", help="run the bpftrace prototype and the core collector side by side on the live "
                                         "workload, compare them, and write the production bundle if they agree")
    pr.add_argument("spec", metavar="SPEC")
    pr.add_argument("--for", dest="for_", default="60s", metavar="DURATION",
                    help="how long the comparison window stays open (60s, 5m; default 60s)")
    pr.add_argument("--pid", type=int, default=-1, help="trace this process only; it is paused (SIGSTOP) for "
                                                        "a moment at each edge of the window, so counts compare exactly")
    pr.add_argument("--pid-file", metavar="FILE", help="trace only the process whose id FILE holds (read once)")
    pr.add_argument("--no-pause", action="store_true", help="never pause the traced process at the window's edges")
    pr.add_argument("-o", "--output", metavar="DIR", help="production bundle folder (default: ./NAME.core)")
    pr.add_argument("--report", metavar="FILE", help="the parity report as JSON (default: ./NAME.parity.json)")
    pr.add_argument("--events-rate", type=int, default=100, metavar="N",
                    help="production default: at most N events a second for each event whose spec sets no "
                         "limit (0: as the spec says; default 100)")
    pr.add_argument("--interval", type=float, default=0.25,
                    help="seconds between the prototype's map dumps (default 0.25): the longest a window edge waits")

    d = sub.add_parser("doctor", help="say what this machine can trace")
    d.add_argument("--format", choices=("text", "json"), default="text",
                   help="json: the full record (tracepoints and their fields, kernel functions, mechanisms) "
                        "that 'probec check --target' reads")
    return p


def _check(args) -> int:
    from . import __version__
    from .compiler.diagnostics import Severity, render_github, render_json, render_sarif, render_text
    from .compiler.driver import check_file
    from .compiler.ir.host import HostFactsError, HostInfo, RecordedHost
    if args.target and args.no_host:
        print("probec: error: --target and --no-host exclude each other", file=sys.stderr)
        return EXIT_USAGE
    try:
        host = RecordedHost.from_file(args.target) if args.target else HostInfo(enabled=not args.no_host)
    except HostFactsError as exc:
        print(f"probec: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    everything = []
    errors = warnings = 0
    color = sys.stderr.isatty() and args.format == "text"
    for path in args.specs:
        result = check_file(path, host, args.kernel)
        if args.backend and result.program is not None and not result.diagnostics.has_errors():
            from .compiler.driver import build_bundle
            build_bundle(result, args.backend, **backend_options(args.backend, args.kernel, compile=False,
                                                                  host_checks=not args.no_host and not args.target))
        diags = result.diagnostics.sorted()
        if args.werror:
            diags = [d if d.severity is not Severity.WARNING else
                     type(d)(Severity.ERROR, d.code, d.message, d.span, d.hints) for d in diags]
        errors += sum(d.severity is Severity.ERROR for d in diags)
        warnings += sum(d.severity is Severity.WARNING for d in diags)
        if args.format == "text":
            sys.stderr.write(render_text(diags, result.sources, color))
        everything.extend(diags)
    if args.format == "json":
        print(render_json(everything))
    elif args.format == "github":
        sys.stdout.write(render_github(everything))
    elif args.format == "sarif":
        print(render_sarif(everything, __version__))
    if args.format in ("text", "github"):
        print(f"{len(args.specs)} spec(s) checked: {errors} error(s), {warnings} warning(s)", file=sys.stderr)
    return EXIT_ERRORS if errors else EXIT_OK


def backend_options(backend: str, kernel: str, compile: bool = True, host_checks: bool = True) -> dict:
    """What `check --backend` and `build` tell a backend about where its output will run."""
    if backend == "core":
        return {"compile": compile}
    if backend == "bcc":
        # this host's kernel headers say something only about this host's kernel
        return {"check_headers": kernel == "host" and host_checks}
    return {}


def _build(args) -> int:
    from .compiler.diagnostics import render_text
    from .compiler.driver import build_bundle, check_file
    from .compiler.ir.host import HostFactsError, RecordedHost
    try:
        host = RecordedHost.from_file(args.target) if args.target else None
    except HostFactsError as exc:
        print(f"probec: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    result = check_file(args.spec, host, kernel=args.kernel, backend=args.backend)
    if result.program is None:
        sys.stderr.write(render_text(result.diagnostics.sorted(), result.sources))
        return EXIT_ERRORS
    options = backend_options(args.backend, args.kernel, compile=not args.no_compile, host_checks=not args.target)
    if args.backend == "bpftrace":
        options["interval_ms"] = max(1, int(args.interval * 1000))
    elif args.backend == "core":
        options["task_storage"] = args.begin_map != "hash"
    bundle = build_bundle(result, args.backend, args.bpftrace_version, **options)
    sys.stderr.write(render_text(result.diagnostics.sorted(), result.sources))
    if bundle is None:
        return EXIT_ERRORS
    out = args.output or f"{result.program.name}.{args.backend}"
    try:
        written = bundle.write(out)
    except OSError as exc:
        print(f"probec: cannot write bundle to '{out}': {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERRORS
    for path in written:
        print(path)
    return EXIT_OK


def _build_from_spec(spec: str, backend: str, interval: float) -> str | None:
    """Convenience for prototyping: `probec run spec.yaml` builds into a temporary bundle first.
    This is the only path on which `run` touches the compiler; the runtime takes the bundle."""
    import tempfile
    from .compiler.diagnostics import render_text
    from .compiler.driver import build_bundle, check_file
    result = check_file(spec, backend=backend)
    if result.program is None:
        sys.stderr.write(render_text(result.diagnostics.sorted(), result.sources))
        return None
    options = {"interval_ms": max(1, int(interval * 1000))} if backend == "bpftrace" else {}
    bundle = build_bundle(result, backend, **options)
    sys.stderr.write(render_text(result.diagnostics.sorted(), result.sources))
    if bundle is None:
        return None
    out = tempfile.mkdtemp(prefix=f"probec-{result.program.name}-")
    bundle.write(out)
    return out


def _monitoring(args) -> int:
    """`probec rules` and `probec dashboard`: read the spec as `check --no-host` does (the rules
    name what the spec exports, whatever this machine has), then write one file."""
    from .compiler.diagnostics import render_text
    from .compiler.driver import check_file
    from .compiler.ir.host import HostInfo
    result = check_file(args.spec, HostInfo(enabled=False), kernel="any")
    sys.stderr.write(render_text(result.diagnostics.sorted(), result.sources))
    if result.program is None:
        return EXIT_ERRORS
    job = args.job or result.program.name
    if args.command == "rules":
        from .compiler.monitoring.rules import render_rules
        text = render_rules(result.spec, result.program, job)
    else:
        from .compiler.monitoring.dashboard import render_dashboard
        text = render_dashboard(result.program, job)
    if not args.output or args.output == "-":
        sys.stdout.write(text)
        return EXIT_OK
    try:
        with open(args.output, "w") as f:
            f.write(text)
    except OSError as exc:
        print(f"probec: cannot write '{args.output}': {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERRORS
    print(args.output)
    return EXIT_OK


def _spec_builder(backend: str, interval: float):
    """How `probec run` with several sources builds a spec: into a temporary bundle, removed when
    the spec stops. None where the compiler is not installed (a runtime-only image)."""
    try:
        from .compiler import driver  # noqa: F401  (is the compiler here at all?)
    except ImportError:
        return None

    def prepare(spec):
        import shutil
        from .runtime.manifest import BundleError
        built = _build_from_spec(str(spec), backend, interval)
        if built is None:
            raise BundleError(f"{spec}: the spec has errors (above)")
        return built, lambda: shutil.rmtree(built, ignore_errors=True)
    return prepare


def _run(args) -> int:
    from .runtime.collector import is_many
    if is_many(args.target):
        from .runtime.collector import run_many
        return run_many(args, args.target, _spec_builder(args.backend or "bpftrace", args.interval))
    args.target = args.target[0]
    if os.path.isfile(args.target) and os.path.splitext(args.target)[1] in (".yaml", ".yml"):
        if getattr(args, "kubelet", None):     # the build finds containers' files through the same pod list
            os.environ.setdefault("PROBEC_KUBELET", args.kubelet)
        built = _build_from_spec(args.target, args.backend or "bpftrace", args.interval)
        if built is None:
            return EXIT_ERRORS
        args.target = built
        try:
            from .runtime.session import run_target
            return run_target(args)
        finally:       # the bundle was only ever this run's: leave no folder behind in /tmp
            import shutil
            shutil.rmtree(built, ignore_errors=True)
    from .runtime.session import run_target
    return run_target(args)


def _btf(args) -> int:
    """`probec btf BUNDLE -o FILE`: the types the bundle's CO-RE relocations read, cut from a full
    BTF by `bpftool gen min_core_btf`, to ship beside the bundle to hosts without kernel BTF."""
    from .compiler.backends.core.toolchain import ToolchainError, min_core_btf
    from .runtime.manifest import BundleError, load_bundle
    try:
        bundle = load_bundle(args.bundle)
        if bundle.backend != "core":
            raise BundleError(f"{args.bundle} is a {bundle.backend} bundle; 'probec btf' cuts BTF for core bundles")
        size = min_core_btf(args.source, args.output, [str(bundle.file("object"))])
    except (BundleError, ToolchainError) as exc:
        print(f"probec: error: {exc}", file=sys.stderr)
        return EXIT_ERRORS
    print(f"{args.output}: {size} bytes of BTF for {bundle.name}; run it with 'probec run BUNDLE --btf {args.output}'",
          file=sys.stderr)
    return EXIT_OK


def _promote(args) -> int:
    from .promote import promote
    return promote(args)


def _doctor(args) -> int:
    from .host.features import doctor_report, host_facts
    if args.format == "json":
        import json
        print(json.dumps(host_facts(), sort_keys=True, separators=(",", ":")))
    else:
        print(doctor_report())
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"check": _check, "build": _build, "run": _run, "promote": _promote, "doctor": _doctor,
                "rules": _monitoring, "dashboard": _monitoring, "btf": _btf}[args.command](args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
