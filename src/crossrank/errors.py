"""The exceptions crossrank raises on purpose, in one place (as httpx documents its own).

Every error a front door may need to tell apart derives from :class:`CrossrankError`, so
``except crossrank.CrossrankError`` catches exactly what crossrank raised deliberately, and
the built-in base each one also has (``ValueError``, ``RuntimeError`` …) keeps ``except
ValueError`` code working. Bad *input* to a call (a document that is not a ``str``) stays a
plain ``TypeError``/``ValueError`` naming the item, as Python's own functions do.

Hierarchy::

    CrossrankError
    ├── OptionError (ValueError)         a bad engine option or server setting; .param names it
    │   └── OptionTypeError (TypeError)  ... of the wrong type
    ├── ModelLoadError (RuntimeError)    a model or tokenizer cannot be loaded
    ├── QueueFullError (RuntimeError)    the micro-batching queue is full (a server's 429)
    ├── LLMError (RuntimeError)          the demo's LLM step failed
    └── MissingExtraError (ImportError)  an optional extra is not installed
"""

from __future__ import annotations

import importlib
from types import ModuleType


class CrossrankError(Exception):
    """Base class of every error crossrank raises deliberately."""


class OptionError(CrossrankError, ValueError):
    """A bad engine option or server setting. ``param`` is its name (``"chunk_overlap"``),
    so a command line or a config schema can name its own flag or field without parsing
    text."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[type[OptionError], tuple[str, str]]:
        """Pickled with both arguments (by default an exception pickles its ``args``, the
        message alone), so it crosses process boundaries: a Ray Serve handle, a
        multiprocessing pool."""
        return type(self), (self.param, self.args[0])


class OptionTypeError(OptionError, TypeError):
    """An engine option of the wrong type (also a ``TypeError``)."""


class ModelLoadError(CrossrankError, RuntimeError):
    """A model or tokenizer could not be loaded; the message says why and what to do."""


class QueueFullError(CrossrankError, RuntimeError):
    """The micro-batching queue already holds its maximum of pending pairs."""


class LLMError(CrossrankError, RuntimeError):
    """The LLM step of the RAG demo failed (unreachable endpoint, bad answer)."""


class MissingExtraError(CrossrankError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


def require_extra(module: str, extra: str, *, feature: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra to install,
    e.g. ``require_extra("onnxruntime", "onnx")`` -> ``pip install "crossrank[onnx]"``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        what = feature or f"this feature of crossrank ({module})"
        raise MissingExtraError(
            f"{what} needs the optional extra '{extra}': pip install \"crossrank[{extra}]\" "
            f"(missing: {err.name or module})"
        ) from err
