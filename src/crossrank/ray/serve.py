"""Scale-out on Ray (the ``ray`` extra): batch scoring with Ray Data, serving with Ray Serve.

Both hold one :class:`~crossrank.Reranker` per Ray actor, one actor per GPU by default on a
cluster with GPUs, so a user never writes a distribution layer of their own.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, cast

import numpy as np
import pyarrow as pa
import ray
import ray.data
from fastapi import FastAPI
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    field_validator,
    model_validator,
)
from ray import serve

from crossrank.engine import DEFAULT_MODEL, Reranker, check_options
from crossrank.options import Aggregate, Backend, LongDocsMode
from crossrank.result import RerankResult
from crossrank.server.settings import ServerSettings
from crossrank.tabular import Columns, score_table
from crossrank.validation import check_documents, check_query, check_top_n

logger = logging.getLogger(__name__)

__all__ = ["RerankAppArgs", "RerankDeployment", "build_app", "run_app", "score_dataset"]

#: Requests one replica works on at once (Serve's default of 5 would starve the engine's
#: batching; the engine's own queue limit still answers 429 beyond ``max_queue`` pairs).
_MAX_ONGOING = 64


def cluster_has_gpus() -> bool:
    """Whether the Ray cluster (connected to, or started, here) has any GPU."""
    if not ray.is_initialized():
        ray.init()
    return bool(ray.cluster_resources().get("GPU", 0))


class _DatasetScorer:
    """A Ray Data actor: loads one engine, then scores the batches it is given."""

    def __init__(self, model: str, columns: Columns, reranker_options: dict[str, Any]) -> None:
        self.reranker = Reranker(model, **reranker_options)
        self.columns = columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        return score_table(self.reranker, batch, self.columns)


def score_dataset(
    ds: ray.data.Dataset,
    *,
    query_col: str = "query",
    doc_col: str = "document",
    out_col: str = "score",
    model: str = DEFAULT_MODEL,
    concurrency: int | tuple[int, int] = 1,
    batch_size: int = 1024,
    num_gpus: float | None = None,
    num_cpus: float | None = None,
    **reranker_options: Any,
) -> ray.data.Dataset:
    """Score every row of ``ds`` with a pool of reranker actors; lazy, like any Ray Data op.

    Each output row is its input row, all columns unchanged (so an id or order-key column
    survives), plus a float32 ``out_col``; no row is dropped, added or merged. Rows come
    back in input order when the dataset's ``DataContext`` has
    ``execution_options.preserve_order = True``; otherwise join on a key column.

    ``concurrency`` is the actor pool: ``N`` engines, or ``(min, max)`` to let Ray Data grow
    the pool with the backlog. ``num_gpus`` per actor defaults to 1 on a cluster with GPUs
    (one engine per GPU; ``0.5`` packs two per GPU) and 0 otherwise. ``batch_size`` rows go to
    one engine call, which sorts them by length and cuts token-budgeted forward passes, so
    larger batches pad less. Other keyword arguments go to :class:`~crossrank.Reranker`
    (``device``, ``dtype``, ``max_length``, ``normalize``, ``batch_tokens``...).

    A row whose query is not a non-blank string, or whose document is not a string, fails
    the job with an error that shows the row.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    compute = _actor_pool(concurrency)
    if os.path.exists(model):  # a relative path must mean the same in every actor
        model = os.path.abspath(model)
    if num_gpus is None:
        num_gpus = 1.0 if cluster_has_gpus() else 0.0
    resources: dict[str, Any] = {"num_gpus": num_gpus}
    if num_cpus is not None:
        resources["num_cpus"] = num_cpus
    return ds.map_batches(
        _DatasetScorer,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=compute,
        fn_constructor_kwargs={
            "model": model,
            "columns": Columns(query_col, doc_col, out_col),
            "reranker_options": reranker_options,
        },
        udf_modifying_row_count=False,
        **resources,
    )


def _actor_pool(concurrency: int | tuple[int, int]) -> ray.data.ActorPoolStrategy:
    if isinstance(concurrency, int) and not isinstance(concurrency, bool) and concurrency >= 1:
        return ray.data.ActorPoolStrategy(size=concurrency)
    if (
        isinstance(concurrency, tuple)
        and len(concurrency) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) for n in concurrency)
        and 1 <= concurrency[0] <= concurrency[1]
    ):
        return ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
    raise ValueError(
        f"concurrency must be a positive int or a (min, max) tuple with 1 <= min <= max, "
        f"got {concurrency!r}"
    )


# ------------------------------------------------------------------------------ Ray Serve
@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=_MAX_ONGOING)
@serve.ingress()
class RerankDeployment:
    """A Ray Serve replica: one engine, the HTTP API of ``crossrank serve``, a handle API.

    HTTP requests reach the server's own FastAPI app (:func:`crossrank.server.create_app`),
    built once per replica around this replica's engine, so routes, schemas, errors, limits,
    auth and metrics are exactly those of the single-process server. Python callers holding
    a ``DeploymentHandle`` call :meth:`rerank`; concurrent calls are merged with
    ``@serve.batch`` into one engine call. Both paths end in the engine's micro-batching queue,
    which cuts token-budgeted forward passes shared by all traffic of the replica.

    The model is loaded and warmed up in the constructor, so Serve sends a new replica (a
    restart, an autoscaling step) traffic only once it can score. Build it with
    :func:`build_app` (which picks one GPU per replica on a GPU cluster), or bind it yourself:
    ``RerankDeployment.options(ray_actor_options={"num_gpus": 1}).bind(model, device=...)``.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        settings: ServerSettings | None = None,
        **reranker_options: Any,
    ) -> None:
        self.settings = settings or ServerSettings()
        self.reranker = Reranker(model, **reranker_options)
        self.reranker.warmup()

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Called by Serve after the constructor: the server's app around this engine."""
        from crossrank.server.app import create_app

        return create_app(self.reranker, self.settings)

    async def rerank(
        self, query: str, documents: list[str], top_n: int | None = None
    ) -> list[RerankResult]:
        """Rank ``documents`` for ``query``, best first: ``Reranker.rerank`` over a handle.

        As over HTTP, results carry no ``best_span`` (chunk mode still scores by windows).
        """
        top_n = check_top_n(top_n)
        check_query(query)
        docs = check_documents(documents)
        if not docs:
            return []
        scores = await self._score_calls((query, docs))
        return Reranker.to_results(docs, scores, top_n=top_n)

    @serve.batch(max_batch_size=_MAX_ONGOING, batch_wait_timeout_s=0.005)
    async def _score_calls(self, calls: list[tuple[str, list[str]]]) -> list[np.ndarray]:
        """One engine call for every handle call that arrived together (already validated)."""
        pairs = [(query, doc) for query, docs in calls for doc in docs]
        scores = await self.reranker.ascore_pairs(pairs)
        ends = np.cumsum([len(docs) for _, docs in calls])
        return np.split(scores, ends[:-1])


class RerankAppArgs(BaseModel):
    """What :func:`build_app` builds: the options of ``crossrank serve --ray``, and the
    ``args`` of a Serve config file (``import_path: crossrank.ray:build_app``)."""

    # Errors never repeat the input: it may hold the API key or a cache URL's password.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), hide_input_in_errors=True)

    model: str = Field(DEFAULT_MODEL, description="Hub id or local directory on every node.")
    replicas: PositiveInt | None = Field(None, description="A fixed number of replicas (1).")
    autoscale: tuple[PositiveInt, PositiveInt] | None = Field(
        None, description="MIN:MAX replicas, scaled on ongoing requests per replica."
    )
    target_ongoing_requests: PositiveFloat = Field(
        16, description="With autoscale: requests per replica that Serve aims for."
    )
    num_gpus: NonNegativeFloat | None = Field(
        None, description="GPUs per replica (default 1 on a cluster with GPUs, else 0)."
    )
    num_cpus: NonNegativeFloat = Field(1, description="CPUs per replica.")
    device: str = "auto"
    dtype: str = "auto"
    max_length: int = 512
    query_max_length: int | None = None
    max_batch_tokens: int | None = None
    long_docs: LongDocsMode = "truncate"
    chunk_tokens: int | None = None
    chunk_overlap: int | None = None
    aggregate: Aggregate = "max"
    cache: SecretStr | None = Field(
        default_factory=lambda: _env_secret("CROSSRANK_CACHE"),
        description="Score cache: 'memory' (one per replica) or a redis:// URL shared by the "
        "replicas (default: $CROSSRANK_CACHE; kept secret, as a URL may hold a password).",
    )
    backend: Backend = "torch"
    quantize: bool = False
    max_docs: PositiveInt = 1000
    max_queue: PositiveInt = 10_000
    request_timeout: PositiveFloat = 120.0
    api_key: SecretStr | None = Field(
        default_factory=lambda: _env_secret("CROSSRANK_API_KEY"),
        description="Require 'Authorization: Bearer KEY' (default: $CROSSRANK_API_KEY, read "
        "where the app is built, so a config file need not hold the secret).",
    )

    @field_validator("autoscale", mode="before")
    @classmethod
    def _parse_autoscale(cls, value: Any) -> Any:
        """Accept ``"MIN:MAX"`` as written on a command line or in a config file."""
        if isinstance(value, str):
            low, sep, high = value.partition(":")
            if not sep:
                raise ValueError(f"autoscale must be MIN:MAX, got {value!r}")
            return (low.strip(), high.strip())
        return value

    @model_validator(mode="after")
    def _check_scaling(self) -> RerankAppArgs:
        if self.autoscale is not None:
            if self.replicas is not None:
                raise ValueError("give replicas or autoscale, not both")
            if self.autoscale[0] > self.autoscale[1]:
                raise ValueError(f"autoscale MIN:MAX needs MIN <= MAX, got {self.autoscale}")
        return self

    @model_validator(mode="after")
    def _check_engine(self) -> RerankAppArgs:
        """The engine's own checks, so a bad option fails here rather than in every replica."""
        check_options(**self.engine_options())
        return self

    def engine_options(self) -> dict[str, Any]:
        """The :class:`~crossrank.Reranker` keyword arguments besides the model and device."""
        return {
            "max_length": self.max_length,
            "query_max_length": self.query_max_length,
            "batch_tokens": self.max_batch_tokens,
            "long_docs": self.long_docs,
            "chunk_tokens": self.chunk_tokens,
            "chunk_overlap": self.chunk_overlap,
            "aggregate": self.aggregate,
            "cache": self.cache.get_secret_value() if self.cache is not None else None,
            "backend": self.backend,
            "quantize": self.quantize,
        }


def _env_secret(name: str) -> SecretStr | None:
    value = os.environ.get(name)
    return SecretStr(value) if value else None


def build_app(args: RerankAppArgs | dict[str, Any] | None = None) -> serve.Application:
    """The rerank application: :class:`RerankDeployment` with its replicas and resources.

    Also a Serve application builder, so ``serve run crossrank.ray:build_app model=... ``
    and Serve config files work with the same arguments.
    """
    if not isinstance(args, RerankAppArgs):
        args = RerankAppArgs.model_validate(args or {})
    num_gpus = args.num_gpus
    if num_gpus is None:
        num_gpus = 1.0 if cluster_has_gpus() else 0.0
    scaling: dict[str, Any]
    if args.autoscale is not None:
        scaling = {
            "autoscaling_config": {
                "min_replicas": args.autoscale[0],
                "max_replicas": args.autoscale[1],
                "target_ongoing_requests": args.target_ongoing_requests,
            }
        }
    else:
        scaling = {"num_replicas": args.replicas or 1}
    settings = ServerSettings(
        api_key=args.api_key.get_secret_value() if args.api_key is not None else None,
        max_docs=args.max_docs,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
    )
    model = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    deployment = cast(serve.Deployment, RerankDeployment).options(
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": num_gpus}, **scaling
    )
    return deployment.bind(
        model, settings, device=args.device, dtype=args.dtype, **args.engine_options()
    )


APP_NAME = "crossrank"
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_app(args: RerankAppArgs, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """``crossrank serve --ray``: deploy on the cluster at ``RAY_ADDRESS`` (else a local one)
    and serve until SIGINT or SIGTERM, then delete the application (a cluster keeps running).

    Must run in the main thread (it handles those signals).
    """
    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    logger.info("serving %s on http://%s:%d through Ray Serve", args.model, host, port)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in _STOP_SIGNALS}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        logger.info("stopping: deleting the %r application", APP_NAME)
        serve.delete(APP_NAME)
