"""Attachments: one :class:`Link` per struct bpf_link, and a :class:`LinkGroup` for a request that
makes several (a perf event per CPU)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import BpfError, Call
from .ffi import lib

if TYPE_CHECKING:
    from .objects import BpfObject


class Link:
    """One attachment (struct bpf_link).  ``destroy()`` detaches; idempotent."""

    def __init__(self, ptr: int, description: str, owner: "BpfObject | None" = None):
        self._ptr: int | None = ptr
        self.description = description
        self._owner = owner

    @property
    def fd(self) -> int:
        if self._ptr is None:
            return -1
        return lib().bpf_link__fd(self._ptr)

    @property
    def destroyed(self) -> bool:
        return self._ptr is None

    def destroy(self) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr is None:
            return
        if self._owner is not None:
            self._owner._forget_link(self)
            self._owner = None
        call = Call(f"bpf_link__destroy({self.description})")
        call.check_int(lib().bpf_link__destroy(ptr))

    def __enter__(self) -> "Link":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def __repr__(self) -> str:
        state = "destroyed" if self.destroyed else f"fd={self.fd}"
        return f"<Link {self.description} {state}>"


class LinkGroup:
    """Several links made by one request (a perf event per CPU)."""

    def __init__(self, links: list[Link], description: str):
        self.links = links
        self.description = description

    @property
    def destroyed(self) -> bool:
        return all(link.destroyed for link in self.links)

    def destroy(self) -> None:
        errors = []
        for link in self.links:
            try:
                link.destroy()
            except BpfError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> "LinkGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def __len__(self) -> int:
        return len(self.links)

    def __repr__(self) -> str:
        return f"<LinkGroup {self.description} x{len(self.links)}>"
