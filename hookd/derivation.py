"""Just enough of a `.drv` file (Nix's ATerm) to tell what hookd must publish for it.

`Derive([(name, path, hashAlgo, hash), …], [(drvPath, [outputs]), …], [srcs], system, builder, [args],
[(name, value), …])`. An output with an empty path is one whose path Nix knows only once it is built
(a floating content-addressed output, or an input-addressed one depending on such): its realisation is
what lets a client find it in a cache. A derivation without input derivations is its own resolution.

Pure: parses bytes already read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


class DerivationError(ValueError):
    """The bytes are not a derivation this parser understands."""


@dataclass(frozen=True)
class Output:
    name: str
    path: str  # empty until built (floating content-addressed, or deferred)
    hash_algo: str
    hash: str


@dataclass(frozen=True)
class Derivation:
    outputs: tuple[Output, ...]
    input_drvs: tuple[str, ...]

    @property
    def has_deferred_outputs(self) -> bool:
        """Whether some output's path is decided by the build: its realisations must be published."""
        return any(not o.path for o in self.outputs)

    @property
    def resolved(self) -> bool:
        """Whether this derivation is its own resolution (it has no input derivations)."""
        return not self.input_drvs


_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}
_PLAIN = re.compile(r'[^"\\]*')  # a run of a string's characters that need no unescaping


class _Reader:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def fail(self, what: str) -> DerivationError:
        return DerivationError(f"expected {what} at character {self.pos}")

    def take(self, char: str) -> None:
        if self.text.startswith(char, self.pos):
            self.pos += len(char)
        else:
            raise self.fail(repr(char))

    def value(self) -> Any:
        c = self.text[self.pos : self.pos + 1]
        if c == '"':
            return self.string()
        if c in "[(":
            end = "]" if c == "[" else ")"
            self.pos += 1
            items: list[Any] = []
            while not self.text.startswith(end, self.pos):
                if items:
                    self.take(",")
                items.append(self.value())
            self.pos += 1
            return items if c == "[" else tuple(items)
        raise self.fail("a string, list or tuple")

    def string(self) -> str:
        self.take('"')
        out = []
        while True:
            m = _PLAIN.match(self.text, self.pos)
            end = m.end() if m else self.pos
            out.append(self.text[self.pos : end])
            if end >= len(self.text):
                raise DerivationError("unterminated string")
            self.pos = end + 1
            if self.text[end] == '"':
                return "".join(out)
            escaped = self.text[self.pos : self.pos + 1]
            out.append(_ESCAPES.get(escaped, escaped))
            self.pos += 1


def parse(data: bytes) -> Derivation:
    """The outputs and input derivations of a `Derive(…)` (raises DerivationError on anything else)."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise DerivationError("not UTF-8") from None
    r = _Reader(text)
    r.take("Derive(")
    outputs = r.value()
    r.take(",")
    inputs = r.value()
    try:
        outs = tuple(Output(*(str(x) for x in o)) for o in outputs)
        drvs = tuple(str(i[0]) for i in inputs)
    except (TypeError, IndexError):
        raise DerivationError("unexpected outputs or input derivations") from None
    return Derivation(outs, drvs)
