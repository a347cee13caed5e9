"""One process-wide set of loaded engines, shared by every adapter and front door.

Framework adapters are cheap objects that users create freely (one per retriever, per query
engine, per request handler). Loading a reranker is not cheap, so adapters never own a model:
they ask :func:`get_reranker`, which loads each distinct configuration once and hands the same
:class:`~crossrank.Reranker` to everyone who asks for it again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Hashable
from typing import Any

from crossrank.backends import compute_dtype, resolve_devices
from crossrank.engine import DEFAULT_MODEL, Reranker
from crossrank.options import EngineOptions

logger = logging.getLogger(__name__)

_engines: dict[tuple[Hashable, ...], Reranker] = {}
_key_locks: dict[tuple[Hashable, ...], threading.Lock] = {}
_registry_lock = threading.Lock()


def _hashable(value: Any) -> Hashable:
    """``value`` as part of a dict key: lists (of devices) become tuples."""
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def _registry_key(model: str, options: EngineOptions) -> tuple[Hashable, ...]:
    """The identity of an engine configuration: the model and every option, defaults filled
    in, ``device``/``dtype`` resolved (so ``"auto"`` and the device it picks are one engine)
    and an existing local path made absolute (so ``./m`` and ``/abs/m`` are one)."""
    args = options.as_dict()
    devices = resolve_devices(options)
    args["device"] = tuple(str(device) for device in devices)
    args["dtype"] = str(compute_dtype(options, devices[0]))
    if isinstance(model, str) and os.path.exists(os.path.expanduser(model)):
        model = os.path.realpath(os.path.expanduser(model))
    return (model, *sorted((k, _hashable(v)) for k, v in args.items()))


def get_reranker(model: str = DEFAULT_MODEL, **options: Any) -> Reranker:
    """The shared :class:`Reranker` for ``model`` and ``options``, loaded on first request.

    ``options`` are :class:`~crossrank.options.EngineOptions` fields (``revision``,
    ``device``, ``dtype``, ``max_length``, ``batch_tokens``, ...). Calls with the same
    configuration, from any thread, get the same instance; a configuration is loaded at most once even when
    many threads ask for it at the same moment, while different configurations load in
    parallel. Engines stay loaded for the life of the process; to control an engine's
    lifetime, build a :class:`Reranker` yourself and hand it to the adapters instead.
    """
    engine_options = EngineOptions.build(**options)  # OptionError names a bad option
    key = _registry_key(model, engine_options)
    engine = _engines.get(key)
    if engine is not None:
        return engine
    with _registry_lock:
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:
        engine = _engines.get(key)
        if engine is None:
            logger.info("loading shared engine for %s", model)
            engine = Reranker(model, engine_options)
            with _registry_lock:
                _engines[key] = engine
        return engine
