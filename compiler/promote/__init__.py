"""What `probec promote` needs from the compiler: the comparison of two collectors' snapshots
(parity.py, pure: unit-tested on recorded snapshots), its report (report.py), and the production
bundle's defaults and the facts the compiler knows about each metric (production.py). Running both
collectors needs the runtime too, so that part lives beside the CLI, in probec/promote.py (the
compiler imports no runtime; tests/test_layering.py)."""
