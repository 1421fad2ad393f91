"""probec: a declarative probe compiler for eBPF observability of model serving.

The subpackages live in top-level folders of the checkout (compiler/, runtime/, host/, templates/);
probec/ holds a symlink to each, so a checkout on PYTHONPATH imports its own code and a wheel
installs real files in their place."""

__version__ = "0.1.0"
