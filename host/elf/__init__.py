"""What a uprobe or USDT attachment needs to know about an x86-64 ELF file.

Pure Python (struct, mmap, ctypes), in one module per concern:
- `format`: section and program headers, virtual-address to file-offset translation, notes and
  the build-id (`ElfFormat`, `ElfError`);
- `symbols`: `.symtab`/`.dynsym` symbols with their GNU symbol versions, lookup by C or C++ name
  with "did you mean" suggestions, the symbol at an address, function entry bytes (`ElfFile`);
- `usdt`: SystemTap USDT notes and their argument operands;
- `demangling`: C++ demangling and taking demangled names apart;
- `binaries`: a cache of open files and finding a binary or library by bare name.

The compiler's checker and the runtime both use it; it imports nothing else of probec.
Every problem with the file itself raises `ElfError` with the path in the message; a broken or
truncated file never surfaces as a `struct.error` or `IndexError`.
"""

from .binaries import LIBRARY_DIRS, close_names, find_function, open_elf, resolve_binary, usdt_probes
from .demangling import demangle, qualified_name
from .format import ElfError, ElfFormat, Section, Segment
from .symbols import ENDBR64, SYMBOL_BINDS, SYMBOL_TYPES, ElfFile, Symbol
from .usdt import UsdtArgument, UsdtProbe

__all__ = ["ENDBR64", "LIBRARY_DIRS", "SYMBOL_BINDS", "SYMBOL_TYPES", "ElfError", "ElfFile", "ElfFormat", "Section",
           "Segment", "Symbol", "UsdtArgument", "UsdtProbe", "close_names", "demangle", "find_function", "open_elf",
           "qualified_name", "resolve_binary", "usdt_probes"]
