"""hookd: move every path a Nix builder realises into a signed binary cache.

This file stays empty of imports: the post-build hook imports the package and must start in milliseconds.
How the modules fit together: docs/architecture.md.
"""

__version__ = "0.1.0"
