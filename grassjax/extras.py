"""Optional dependencies (pyproject.toml extras), imported only by the feature that needs them."""

from __future__ import annotations

import importlib


class MissingExtraError(RuntimeError):
    """An optional dependency is not installed; the message names the pip command."""


def require(module: str, *, extra: str, feature: str):
    """`import module`, or MissingExtraError:
    "<feature> needs <module>, ...: pip install -e .[<extra>]"."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{feature} needs {module}, which is not installed: "
                                f"pip install -e .[{extra}]") from None
