"""probec: a declarative probe compiler for eBPF observability of model serving."""

__version__ = "0.1.0"
