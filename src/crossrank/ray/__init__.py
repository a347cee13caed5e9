"""Scale-out on Ray (the ``ray`` extra): batch scoring with Ray Data, serving with Ray Serve.

Both hold one :class:`~crossrank.Reranker` per Ray actor, one actor per GPU by default on a
cluster with GPUs, so a user never writes a distribution layer of their own.

* :mod:`crossrank.ray.data`: :func:`score_dataset` (Ray Data);
* :mod:`crossrank.ray.serve`: :class:`RerankDeployment`, :class:`RerankAppArgs`,
  :func:`build_app` (also a Serve application builder: ``crossrank.ray:build_app``) and
  :func:`run_app` (``crossrank serve --ray``).

The names are resolved on first use (PEP 562), so importing this package costs nothing and
a missing ``ray`` extra is reported by name (``pip install "crossrank[ray]"``) only where a
name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from crossrank.errors import require_extra

if TYPE_CHECKING:
    from crossrank.ray.cluster import cluster_has_gpus
    from crossrank.ray.data import score_dataset
    from crossrank.ray.serve import APP_NAME, RerankAppArgs, RerankDeployment, build_app, run_app

_WHERE = {
    "cluster_has_gpus": "crossrank.ray.cluster",
    "score_dataset": "crossrank.ray.data",
    "APP_NAME": "crossrank.ray.serve",
    "RerankAppArgs": "crossrank.ray.serve",
    "RerankDeployment": "crossrank.ray.serve",
    "build_app": "crossrank.ray.serve",
    "run_app": "crossrank.ray.serve",
}
__all__ = [
    "APP_NAME",
    "RerankAppArgs",
    "RerankDeployment",
    "build_app",
    "cluster_has_gpus",
    "run_app",
    "score_dataset",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'crossrank.ray' has no attribute {name!r}")
    require_extra("ray", "ray", feature="crossrank.ray")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
