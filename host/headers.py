"""The kernel headers BCC compiles against, and whether they are the running kernel's.

BCC builds its programs at load time with clang against kernel headers: `/lib/modules/RELEASE/build`
(and `source`, where a distribution splits them), or the tree `BCC_KERNEL_SOURCE` names. Struct
layouts come from those headers, so a program that reads kernel structs through headers of another
kernel reads the wrong bytes without any error. Tracepoint fields (read at offsets checked against
tracefs), uprobe and USDT arguments and BPF helpers do not depend on them.

Where no headers for the running kernel exist, Debian's `linux-headers-*` packages (an arch folder
with the generated headers, a `-common` folder with the rest) are the fallback, joined into one
tree of symbolic links that `BCC_KERNEL_SOURCE` can name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

MODULES = Path("/lib/modules")
DEBIAN_HEADERS = Path("/usr/src")
_UTS_RELEASE = re.compile(rb'#define\s+UTS_RELEASE\s+"([^"]*)"')


@dataclass(frozen=True)
class KernelHeaders:
    """Headers BCC can use: `build` (generated headers), `source` (the rest; the same folder
    where they are not split), the release they were made for, and the running kernel's."""
    build: Path
    source: Path
    release: str | None         # UTS_RELEASE of the headers; None where it cannot be read
    running: str
    how: str                    # where they were found, for messages

    @property
    def matches(self) -> bool:
        return self.release == self.running

    @property
    def found_by_bcc(self) -> bool:
        """Whether BCC finds these by itself (/lib/modules/RELEASE/build, and `source` where they
        are split); otherwise the runtime names a joined tree in BCC_KERNEL_SOURCE."""
        where = MODULES / self.running
        return self.how == f"/lib/modules/{self.running}" and (
            self.build == self.source or self.source == where / "source")

    def mismatch(self) -> str:
        """One sentence: which headers these are and why reading kernel structs through them is wrong."""
        return (f"the kernel headers BCC compiles against ({self.build}, {self.release or 'release unknown'}) are "
                f"not the running kernel's ({self.running}): kernel struct layouts in them would be wrong here; "
                f"install the headers of {self.running}, or point BCC_KERNEL_SOURCE at them")


def running_release() -> str:
    return os.uname().release


def header_release(build: Path) -> str | None:
    """The UTS_RELEASE the headers in `build` were generated for."""
    for name in ("include/generated/utsrelease.h", "include/linux/utsrelease.h"):
        try:
            m = _UTS_RELEASE.search((build / name).read_bytes())
        except OSError:
            continue
        if m:
            return m.group(1).decode("ascii", "replace")
    return None


def _has_headers(path: Path) -> bool:
    return (path / "include").is_dir()


def find_kernel_headers(release: str | None = None) -> KernelHeaders | None:
    """The headers BCC would use for the running kernel, in BCC's own order, then Debian's
    packages of another kernel; None where there are none at all."""
    running = release or running_release()
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        path = Path(env)
        if _has_headers(path):
            return KernelHeaders(path, path, header_release(path), running, "BCC_KERNEL_SOURCE")
    build = MODULES / running / "build"
    if _has_headers(build):
        source = MODULES / running / "source"
        if not _has_headers(source):
            # Debian's linux-headers-RELEASE makes `build` only, its arch folder: the rest is in
            # the -common folder beside it (BCC alone would miss it)
            source = debian_common(build.resolve()) or build
        return KernelHeaders(build, source, header_release(build), running, f"/lib/modules/{running}")
    return debian_headers(running)


def debian_common(build: Path) -> Path | None:
    """The `linux-headers-VERSION-common` folder beside Debian's `linux-headers-VERSION-FLAVOUR`."""
    if not build.name.startswith("linux-headers-") or (build / "include" / "linux").is_dir():
        return None
    version = build.name[len("linux-headers-"):].rsplit("-", 1)[0]
    common = build.parent / f"linux-headers-{version}-common"
    return common if _has_headers(common) else None


def debian_headers(running: str, root: Path = DEBIAN_HEADERS) -> KernelHeaders | None:
    """The newest Debian `linux-headers-VERSION-FLAVOUR` with its `-common` folder."""
    found = []
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return None
    for path in entries:
        if not path.name.startswith("linux-headers-") or path.name.endswith("-common"):
            continue
        if not (path / "include" / "generated").is_dir():
            continue
        version = path.name[len("linux-headers-"):].rsplit("-", 1)[0]
        common = root / f"linux-headers-{version}-common"
        found.append((_version_key(version), path, common if _has_headers(common) else path))
    if not found:
        return None
    _, build, source = max(found)
    return KernelHeaders(build, source, header_release(build), running, str(build))


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.-]", version))


def joined_tree(headers: KernelHeaders, folder: Path) -> Path:
    """A folder BCC_KERNEL_SOURCE can name: the headers' `build` and `source` joined by symbolic
    links (BCC reads one tree when it is given one). Made once per header folder; returns the
    headers' own folder where they are not split."""
    if headers.build == headers.source:
        return headers.build
    tree = folder / re.sub(r"[^A-Za-z0-9_.-]", "_", str(headers.build).strip("/"))
    if (tree / "include" / "linux").exists():
        return tree
    for sub in ("include", "arch/x86/include"):
        (tree / sub).mkdir(parents=True, exist_ok=True)
        for top in (headers.source, headers.build):
            try:
                names = sorted((top / sub).iterdir())
            except OSError:
                continue
            for entry in names:
                link = tree / sub / entry.name
                if not link.exists() and not link.is_symlink():
                    link.symlink_to(entry)
    for name in ("Makefile",):
        link = tree / name
        if not link.exists() and (headers.source / name).exists():
            link.symlink_to(headers.source / name)
    return tree
