"""probec: a declarative probe compiler for eBPF observability of model serving."""

import os as _os

__version__ = "0.1.0"

# In a checkout, the subpackages live beside this folder (compiler/, runtime/, templates/), and an
# installed wheel has them inside it. Searching the checkout's root as well lets `python -m probec`
# and the tests use the checkout they run in, whichever checkout the package was installed from.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "compiler")) and _os.path.isfile(_os.path.join(_root, "compiler", "driver.py")):
    __path__.append(_root)
