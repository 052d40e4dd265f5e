"""Pins: named store paths kept in the cache itself (under `hookd-pins/`), whose closures GC keeps.

Stored in the cache rather than on one host, so every GC of the cache, wherever it runs, sees them.
"""

from __future__ import annotations

from collections.abc import Iterable

from . import narinfo
from .backends import Backend
from .catalog import PIN_PREFIX
from .storepath import StorePathError, check_basename


class PinError(ValueError):
    """A pin cannot be set as asked (a bad name, not a store path, not in the cache)."""


def check_pin_name(name: str) -> str:
    if not name or len(name) > 200 or not all(c.isalnum() or c in "._-" for c in name) or name[0] == ".":
        raise PinError(f"pin name {name!r}: use letters, digits, '.', '_' and '-'")
    return name


async def pin(backend: Backend, name: str, store_path: str, require_present: bool = True) -> None:
    check_pin_name(name)
    base = store_path.rsplit("/", 1)[-1]
    try:
        check_basename(base)
    except StorePathError as e:
        raise PinError(str(e)) from None
    if require_present and not await backend.exists(narinfo.narinfo_key(store_path)):
        raise PinError(f"{store_path} is not in {backend.url}; push it first (`hookd push --pin {name} PATH`)")
    await backend.put(PIN_PREFIX + name, (store_path + "\n").encode(), "text/plain; charset=utf-8")


async def unpin(backend: Backend, name: str) -> bool:
    check_pin_name(name)
    if not await backend.exists(PIN_PREFIX + name):
        return False
    await backend.delete(PIN_PREFIX + name)
    return True


async def read_pins(backend: Backend, keys: Iterable[str]) -> dict[str, str]:
    """Pin name -> store path, for the pin objects `keys` (one deleted meanwhile, or empty, pins nothing)."""
    pins = {}
    for key in keys:
        data = await backend.get(key)
        if path := data.decode(errors="replace").strip() if data else "":
            pins[key[len(PIN_PREFIX) :]] = path
    return pins


async def list_pins(backend: Backend) -> dict[str, str]:
    return await read_pins(backend, [obj.key async for obj in backend.list(PIN_PREFIX)])
