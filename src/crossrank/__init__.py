"""crossrank: fast, native cross-encoder reranking for RAG pipelines.

``import crossrank`` is instant: the engine (torch, transformers) is imported when
:class:`Reranker` is first touched (PEP 562 module ``__getattr__``), so a command line's
``--help``, a config check or an ``except crossrank.CrossrankError`` costs no model stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from crossrank.errors import (
    CrossrankError,
    LLMError,
    MissingExtraError,
    ModelLoadError,
    OptionError,
    OptionTypeError,
    QueueFullError,
)
from crossrank.options import EngineOptions
from crossrank.result import RerankResult

if TYPE_CHECKING:
    from crossrank.engine import Reranker

__version__: str  # resolved on first use, from the package metadata

#: Public names resolved on first use, and the module that defines each.
_LAZY = {"Reranker": "crossrank.engine"}

__all__ = [
    "CrossrankError",
    "EngineOptions",
    "LLMError",
    "MissingExtraError",
    "ModelLoadError",
    "OptionError",
    "OptionTypeError",
    "QueueFullError",
    "RerankResult",
    "Reranker",
    "__version__",
]


def _version() -> str:
    """The installed distribution's version (read on first use: importlib.metadata alone
    costs more than the rest of ``import crossrank``)."""
    from importlib import metadata

    try:
        return metadata.version("crossrank")
    except metadata.PackageNotFoundError:  # a source tree that is not installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = _version()
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'crossrank' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, "__version__"])
