"""Human sizes and durations as the command line takes them: `10G`, `1.5TiB`, `30d`, `12h30m` (render.py
writes them back)."""

from __future__ import annotations

import re

_SIZE = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """Bytes from `500M`, `10G`, `1.5TiB`, `123` (binary multiples, as `du -h` prints them)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 500M, 10G, 1.5TiB)")
    return int(float(m.group(1)) * _SIZE[m.group(2)])


def parse_duration(text: str) -> float:
    """Seconds from `30d`, `12h`, `1h30m`, `90s`, `2w` (a bare number is seconds)."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a duration (examples: 30d, 12h, 1h30m, 90s)")
    return sum(float(n) * _DURATION[u] for n, u in parts)
