"""One process-wide set of loaded engines, shared by every adapter and front door.

Framework adapters are cheap objects that users create freely (one per retriever, per query
engine, per request handler). Loading a reranker is not cheap, so adapters never own a model:
they ask :func:`get_reranker`, which loads each distinct configuration once and hands the same
:class:`~crossrank.Reranker` to everyone who asks for it again.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import Hashable
from typing import Any

from crossrank.engine import DEFAULT_MODEL, Reranker
from crossrank.loading import resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

_SIGNATURE = inspect.signature(Reranker)
_engines: dict[tuple[Hashable, ...], Reranker] = {}
_key_locks: dict[tuple[Hashable, ...], threading.Lock] = {}
_registry_lock = threading.Lock()


def _registry_key(model: str = DEFAULT_MODEL, **options: Any) -> tuple[Hashable, ...]:
    """The identity of an engine configuration: every :class:`Reranker` argument, defaults
    filled in, ``device``/``dtype`` resolved (so ``"auto"`` and the device it picks are one
    engine) and an existing local path made absolute (so ``./m`` and ``/abs/m`` are one)."""
    bound = _SIGNATURE.bind(model, **options)  # TypeError names an unknown option
    bound.apply_defaults()
    args = dict(bound.arguments)
    device = resolve_device(args["device"])
    args["device"] = str(device)
    args["dtype"] = str(resolve_dtype(args["dtype"], device))
    name = args["model_name_or_path"]
    if isinstance(name, str) and os.path.exists(os.path.expanduser(name)):
        args["model_name_or_path"] = os.path.realpath(os.path.expanduser(name))
    return tuple(sorted(args.items()))


def get_reranker(model: str = DEFAULT_MODEL, **options: Any) -> Reranker:
    """The shared :class:`Reranker` for ``model`` and ``options``, loaded on first request.

    ``options`` are :class:`Reranker`'s keyword arguments (``revision``, ``device``,
    ``dtype``, ``max_length``, ``batch_tokens``, ...). Calls with the same configuration,
    from any thread, get the same instance; a configuration is loaded at most once even when
    many threads ask for it at the same moment, while different configurations load in
    parallel. Engines stay loaded for the life of the process; to control an engine's
    lifetime, build a :class:`Reranker` yourself and hand it to the adapters instead.
    """
    key = _registry_key(model, **options)
    engine = _engines.get(key)
    if engine is not None:
        return engine
    with _registry_lock:
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:
        engine = _engines.get(key)
        if engine is None:
            logger.info("loading shared engine for %s", model)
            engine = Reranker(model, **options)
            with _registry_lock:
                _engines[key] = engine
        return engine
