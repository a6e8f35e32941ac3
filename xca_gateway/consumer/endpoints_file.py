"""Reading a demo's ``endpoints.json`` (docs/contract.md) for the consumer commands.

Every error is one line naming the file and what is wrong with it: missing or unreadable file,
not JSON, a community it does not list (with the ones it does), an identity it does not have.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class EndpointsError(ValueError):
    """The endpoints file, or what was asked of it, is not usable (the message says why)."""


@dataclass(frozen=True)
class Identity:
    """A certificate and key to call with, and where they came from (for messages)."""

    name: str
    cert: Path
    key: Path


@dataclass(frozen=True)
class Community:
    name: str
    home_community_id: str
    assigning_authority: str
    endpoints: dict[str, str]
    admin: str | None
    identities: dict[str, Identity]
    raw: dict[str, Any]

    @property
    def base_url(self) -> str:
        """The community's gateway base URL (``https://host:port``)."""
        url = self.endpoints.get("iti18") or self.endpoints.get("iti38") or ""
        return url.rsplit("/", 2)[0]


@dataclass(frozen=True)
class EndpointsFile:
    path: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, path: Path) -> EndpointsFile:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise EndpointsError(
                f"{path}: file not found (is the demo running? it writes this file when ready)"
            ) from None
        except PermissionError:
            raise EndpointsError(f"{path}: not readable: permission denied") from None
        except OSError as exc:
            raise EndpointsError(f"{path}: cannot be read: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EndpointsError(f"{path}: not JSON: {exc.msg} (line {exc.lineno})") from None
        if not isinstance(data, dict) or not isinstance(data.get("communities"), list):
            raise EndpointsError(f'{path}: no "communities" list: not a demo\'s endpoints.json')
        return cls(path, data)

    def _key(self, obj: dict[str, Any], key: str, where: str) -> Any:
        try:
            return obj[key]
        except (KeyError, TypeError):
            raise EndpointsError(f"{self.path}: {where} has no {key!r}") from None

    @property
    def community_names(self) -> list[str]:
        return [str(c.get("name")) for c in self.data["communities"] if isinstance(c, dict)]

    def community(self, name: str | None) -> Community:
        """The named community; without a name, the first one."""
        items = [c for c in self.data["communities"] if isinstance(c, dict)]
        if not items:
            raise EndpointsError(f"{self.path}: lists no community")
        if name is None:
            raw = items[0]
        else:
            found = [c for c in items if c.get("name") == name]
            if not found:
                raise EndpointsError(
                    f"{self.path}: no community {name!r} "
                    f"(it lists: {', '.join(self.community_names)})"
                )
            raw = found[0]
        where = f"community {raw.get('name')!r}"
        identities = {
            key: Identity(
                key,
                Path(self._key(pair, "cert", f"{where} identity {key!r}")),
                Path(self._key(pair, "key", f"{where} identity {key!r}")),
            )
            for key, pair in (raw.get("identities") or {}).items()
        }
        return Community(
            name=str(self._key(raw, "name", "a community")),
            home_community_id=str(self._key(raw, "homeCommunityId", where)),
            assigning_authority=str(self._key(raw, "patientIdAssigningAuthority", where)),
            endpoints=dict(self._key(raw, "endpoints", where)),
            admin=raw.get("admin"),
            identities=identities,
            raw=raw,
        )

    def other_community(self, name: str) -> Community:
        """The first community that is not ``name`` (a peer to call from)."""
        for other in self.community_names:
            if other != name:
                return self.community(other)
        raise EndpointsError(f"{self.path}: no community other than {name!r}")

    @property
    def ca(self) -> Path:
        return Path(self._key(self.data, "ca", "the file"))

    @property
    def client(self) -> Identity:
        pair = self._key(self.data, "client", "the file")
        return Identity("client", Path(pair["cert"]), Path(pair["key"]))

    def identity(self, community: Community, name: str | None, *, default: str) -> Identity:
        """``community``'s identity ``name`` (default ``default``) when the file has
        ``identities``; else the top-level ``client`` (files written before identities)."""
        wanted = name or default
        if wanted == "client":
            return self.client
        if not community.identities:
            if name is not None:
                raise EndpointsError(
                    f"{self.path}: community {community.name!r} has no identities "
                    f'(--identity {name}); leave --identity out to use "client"'
                )
            return self.client
        if wanted not in community.identities:
            raise EndpointsError(
                f"{self.path}: community {community.name!r} has no identity {wanted!r} "
                f'(it has: {", ".join(sorted(community.identities))}, and "client")'
            )
        return community.identities[wanted]

    def community_names_by_home(self) -> dict[str, str]:
        return {
            str(c.get("homeCommunityId")): str(c.get("name"))
            for c in self.data["communities"]
            if isinstance(c, dict)
        }

    def home_community_id(self, value: str) -> str:
        """A community's name or its homeCommunityId → the homeCommunityId."""
        if value.startswith("urn:oid:"):
            return value
        for home, name in self.community_names_by_home().items():
            if name == value:
                return home
        raise EndpointsError(
            f"{self.path}: no community {value!r} (it lists: {', '.join(self.community_names)})"
        )
