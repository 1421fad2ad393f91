"""Reading a bundle's manifest. The runtime's only source of truth about maps and metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_MANIFEST = 1


class BundleError(Exception):
    """A bundle that cannot be used, with a message a person can act on."""


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    def file(self, role: str) -> Path:
        name = self.manifest.get("files", {}).get(role)
        if not name:
            raise BundleError(f"bundle {self.path} has no {role} file in its manifest")
        p = self.path / name
        if not p.exists():
            raise BundleError(f"bundle {self.path} is missing {name}; rebuild it with probec build")
        return p

    def map(self, name: str) -> dict:
        for m in self.manifest["maps"]:
            if m["name"] == name:
                return m
        raise BundleError(f"manifest names map '{name}' but does not describe it")


def load_bundle(path: str | Path) -> Bundle:
    p = Path(path)
    mf = p / "manifest.json" if p.is_dir() else p
    if not mf.exists():
        raise BundleError(f"'{path}' is not a probec bundle (no manifest.json); build one with "
                          "'probec build SPEC --backend core -o DIR'")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {mf}: {exc}") from None
    version = manifest.get("probec_manifest")
    if version != SUPPORTED_MANIFEST:
        raise BundleError(f"{mf} has manifest version {version}; this runtime reads version {SUPPORTED_MANIFEST}")
    return Bundle(mf.parent, manifest)
