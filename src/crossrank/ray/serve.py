"""Serving on Ray Serve: :class:`RerankDeployment` (one engine per replica, the HTTP API of
``crossrank serve``), :class:`RerankAppArgs` (its options, as a Serve config file or
``crossrank serve --ray`` gives them) and :func:`build_app` / :func:`run_app`.

The engine options and server settings of :class:`RerankAppArgs` are generated from
:func:`crossrank.options.option_fields` (of :class:`~crossrank.options.EngineOptions` and
:class:`~crossrank.server.settings.ServerSettings`) and checked by building those types, so a
config file takes exactly the options ``crossrank serve`` has, under the flat keys its flags
use (``max_batch_tokens``, ``long_docs``, ``served_model_name``), and a bad value is named.
Before, the server settings were declared here again by hand and ``serve --ray`` passed on
only four of them: ``--served-model-name`` and the timeouts were silently dropped. The
settings that the HTTP server holding the connections applies (header and keep-alive
timeouts, connection limit, header size) cannot apply behind Ray's proxy, so a value other
than the default is refused, never ignored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import signal
import threading
from typing import Annotated, Any, cast, get_origin

import numpy as np
import ray
from fastapi import FastAPI
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    create_model,
    field_validator,
    model_validator,
)
from ray import serve

from crossrank.engine import Reranker
from crossrank.errors import OptionError
from crossrank.options import DEFAULT_MODEL, EngineOptions, OptionField, option_fields
from crossrank.ray.cluster import cluster_has_gpus
from crossrank.result import RerankResult, to_results
from crossrank.server.settings import CONNECTION_SETTINGS, ServerSettings
from crossrank.validation import check_documents, check_query, check_top_n

logger = logging.getLogger(__name__)

__all__ = ["APP_NAME", "RerankAppArgs", "RerankDeployment", "build_app", "run_app", "stop_app"]

#: Requests one replica works on at once (Serve's default of 5 would starve the engine's
#: batching; the engine's own queue limit still answers 429 beyond ``max_queue`` pairs).
_MAX_ONGOING = 64
_HandleCall = tuple[str, list[str], str | None]  # query, documents, instruction (checked)


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
    ``RerankDeployment.options(ray_actor_options={"num_gpus": 1}).bind(model, device=...)``
    (keyword arguments, or ``options=EngineOptions(...)``, as :class:`~crossrank.Reranker`
    takes them).
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        settings: ServerSettings | None = None,
        options: EngineOptions | None = None,
        **overrides: Any,
    ) -> None:
        self.settings = settings or ServerSettings()
        refuse_connection_settings(self.settings)  # Serve's proxy holds the connections
        self.reranker = Reranker(model, options, **overrides)
        self.reranker.warmup()
        self.http_app: FastAPI | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Called by Serve after the constructor: the server's app around this engine."""
        from crossrank.server.app import create_app

        self.http_app = create_app(self.reranker, self.settings)
        return self.http_app

    def drain(self) -> None:
        """Answer 503 from now on (:func:`crossrank.server.app.start_draining`): the
        application is about to be deleted (:func:`run_app` calls it on every replica)."""
        from crossrank.server.app import start_draining

        if self.http_app is not None:
            start_draining(self.http_app)

    async def rerank(
        self,
        query: str,
        documents: list[str],
        top_n: int | None = None,
        instruction: str | None = None,
    ) -> list[RerankResult]:
        """Rank ``documents`` for ``query``, best first: ``Reranker.rerank`` over a handle.

        ``instruction``: a decoder (LLM) reranker's task instruction for this call (``None``:
        the engine's), as the engine's methods take it; an encoder refuses one. As over
        HTTP, results carry no ``best_span`` (chunk mode still scores by windows).
        """
        top_n = check_top_n(top_n)
        check_query(query)
        docs = check_documents(documents)
        instruction = self.reranker.tokenizer.check_instruction(instruction)
        if not docs:
            return []
        scores = await self._score_calls((query, docs, instruction))
        return to_results(docs, scores, top_n=top_n)

    @serve.batch(max_batch_size=_MAX_ONGOING, batch_wait_timeout_s=0.005)
    async def _score_calls(self, calls: list[_HandleCall]) -> list[np.ndarray]:
        """One engine call per instruction for the handle calls that arrived together
        (already validated); the calls of different instructions are scored concurrently,
        so the engine's queue still merges them into shared forward passes."""
        groups: dict[str | None, list[int]] = {}
        for i, (_, _, instruction) in enumerate(calls):
            groups.setdefault(instruction, []).append(i)
        members = list(groups.values())
        parts = await asyncio.gather(*(self._score_group([calls[i] for i in m]) for m in members))
        by_call = {
            i: scores
            for group, group_scores in zip(members, parts, strict=True)
            for i, scores in zip(group, group_scores, strict=True)
        }
        return [by_call[i] for i in range(len(calls))]

    async def _score_group(self, calls: list[_HandleCall]) -> list[np.ndarray]:
        """Scores of handle calls that share one instruction, in one engine call."""
        pairs = [(query, doc) for query, docs, _ in calls for doc in docs]
        scores = await self.reranker.ascore_pairs(pairs, instruction=calls[0][2])
        ends = np.cumsum([len(docs) for _, docs, _ in calls])
        return np.split(scores, ends[:-1])


def _env_secret(name: str | None, *, keep_empty: bool) -> SecretStr | None:
    """``$name``, read where the app is built; an empty value is unset unless ``keep_empty``
    (then the setting's own check refuses it: fail closed)."""
    value = os.environ.get(name) if name else None
    return SecretStr(value) if value or (keep_empty and value is not None) else None


def _refuse_bool(name: str, value: Any) -> Any:
    """A number field must not take ``true``: lax parsing would read it as 1."""
    if isinstance(value, bool):
        raise OptionError(name, f"{name} must not be true or false, got {value!r}")
    return value


def _one_as_list(value: Any) -> Any:
    """A repeatable setting given one plain string (``served_model_name: alias``)."""
    return [value] if isinstance(value, str) else value


def _schema_field(option: OptionField, *, keep_empty_env: bool = False) -> tuple[Any, Any]:
    """The schema field of one option, under the option's own type; a secret one is a
    ``SecretStr`` that defaults to its environment variable, read where the app is built."""
    if option.secret:
        from_env = Field(
            default_factory=functools.partial(
                _env_secret, option.envvar, keep_empty=keep_empty_env
            ),
            description=f"{option.help} (default: ${option.envvar}, read where the app is "
            "built, so a config file need not hold it; kept secret)",
        )
        return SecretStr | None, from_env
    annotation, default = option.annotation, option.default
    if option.name == "device":  # one device, or a list of them (one engine each)
        annotation = str | list[str]
    elif get_origin(annotation) is list:  # a repeatable flag (its default is a tuple)
        annotation = Annotated[annotation, BeforeValidator(_one_as_list)]
        default = list(default)
    elif annotation is not bool:
        refuse_bool = functools.partial(_refuse_bool, option.key)
        annotation = Annotated[annotation, BeforeValidator(refuse_bool)]
    return annotation, Field(default, description=option.help)


class _AppArgsBase(BaseModel):
    # Errors never repeat the input: it may hold the API key or a cache URL's password.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), hide_input_in_errors=True)


#: The generated part of the schema: every engine option and every server setting that has a
#: flag, each under its config key (a name in both would be a TypeError here, at import).
_ENGINE_FIELDS = tuple(option_fields())
_SERVER_FIELDS = tuple(option_fields(ServerSettings))
_OptionArgs: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "_OptionArgs",
    __base__=_AppArgsBase,
    **{option.key: _schema_field(option) for option in _ENGINE_FIELDS},
    **{option.key: _schema_field(option, keep_empty_env=True) for option in _SERVER_FIELDS},
)


def refuse_connection_settings(settings: ServerSettings) -> None:
    """Raise :class:`~crossrank.errors.OptionError` for a connection setting
    (:data:`~crossrank.server.settings.CONNECTION_SETTINGS`) other than its default: on Ray
    Serve, Ray's HTTP proxy holds the client connections, so crossrank could not apply it
    (fail closed rather than ignore it)."""
    defaults = ServerSettings()
    for name in CONNECTION_SETTINGS:
        if getattr(settings, name) != getattr(defaults, name):
            raise OptionError(
                name,
                f"{name} cannot apply on Ray Serve: Ray's HTTP proxy, not crossrank, holds the "
                "client connections; set connection limits on the proxy (Serve's http_options, "
                "e.g. keep_alive_timeout_s) or on the load balancer in front of it",
            )


def _differing(given: Any, kept: Any) -> list[str]:
    """The fields of dataclass ``given`` whose value ``kept`` does not have."""
    return [
        f.name for f in dataclasses.fields(given) if getattr(given, f.name) != getattr(kept, f.name)
    ]


class RerankAppArgs(_OptionArgs):  # type: ignore[misc,valid-type]
    """What :func:`build_app` builds: the options of ``crossrank serve --ray``, and the
    ``args`` of a Serve config file (``import_path: crossrank.ray:build_app``): the replica
    options below, every engine option (``long_docs``, ``max_batch_tokens``, ``cache``...; see
    :class:`~crossrank.options.EngineOptions`) and every server setting with a flag
    (``api_key``, ``served_model_name``, ``max_docs``, ``max_queue``, timeouts...; see
    :class:`~crossrank.server.settings.ServerSettings`), checked by building those types.

    The connection settings (``timeout_header``, ``timeout_keep_alive``,
    ``limit_concurrency``, ``max_header_bytes``) are refused unless left at their defaults:
    Ray's HTTP proxy, not the replicas, holds the connections
    (:func:`refuse_connection_settings`).
    """

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
    drain_seconds: float = Field(
        5.0,
        ge=0,
        le=300,
        description="On SIGINT/SIGTERM (crossrank serve --ray): seconds every replica answers "
        "503 (with Retry-After) before the application is deleted, so load balancers take it "
        "out and in-flight requests finish (a second signal cuts it short).",
    )

    @classmethod
    def from_options(
        cls, settings: ServerSettings, engine: EngineOptions, **replica: Any
    ) -> RerankAppArgs:
        """The args that serve with ``settings`` and ``engine`` (what ``crossrank serve``
        has) plus the ``replica`` options (``model``, ``replicas``, ``autoscale``...).

        Raises :class:`~crossrank.errors.OptionError` naming a setting or option that a Ray
        Serve app cannot carry (a connection setting, or one with no config key, such as
        ``max_body_bytes``) when it is not at its default: nothing is dropped silently.
        """
        refuse_connection_settings(settings)
        values = {f.key: getattr(engine, f.name) for f in _ENGINE_FIELDS}
        values |= {f.key: getattr(settings, f.name) for f in _SERVER_FIELDS}
        args = cast(RerankAppArgs, cls.model_validate({**replica, **values}))
        dropped = _differing(settings, args.server_settings())
        dropped += _differing(engine, args.engine_options())
        if dropped:
            raise OptionError(
                dropped[0],
                f"{', '.join(dropped)}: no config key on Ray Serve; leave at the default",
            )
        return args

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
    def _check_options(self) -> RerankAppArgs:
        """The engine's and the server's own checks, so a bad value fails here, named, rather
        than in every replica (an ``OptionError`` is a ``ValueError``: pydantic reports it
        under this model)."""
        self.engine_options()
        self.server_settings()
        return self

    def engine_options(self) -> EngineOptions:
        """The engine options of every replica (secrets revealed: only for the engine)."""
        return EngineOptions(**self._revealed(_ENGINE_FIELDS))

    def server_settings(self) -> ServerSettings:
        """The server settings of every replica (the API key revealed: only for the server);
        a connection setting other than its default is refused."""
        settings = ServerSettings(**self._revealed(_SERVER_FIELDS))
        refuse_connection_settings(settings)
        return settings

    def _revealed(self, fields: tuple[OptionField, ...]) -> dict[str, Any]:
        values = {option.name: getattr(self, option.key) for option in fields}
        return {
            name: value.get_secret_value() if isinstance(value, SecretStr) else value
            for name, value in values.items()
        }


def build_app(args: RerankAppArgs | dict[str, Any] | None = None) -> serve.Application:
    """The rerank application: :class:`RerankDeployment` with its replicas and resources.

    Also a Serve application builder, so ``serve run crossrank.ray:build_app model=... ``
    and Serve config files work with the same arguments.
    """
    if not isinstance(args, RerankAppArgs):
        args = RerankAppArgs.model_validate(args or {})
    args = cast(RerankAppArgs, args)  # (mypy cannot narrow a class with a generated base)
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
    model = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    deployment = cast(serve.Deployment, RerankDeployment).options(
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": num_gpus}, **scaling
    )
    return deployment.bind(model, args.server_settings(), args.engine_options())


APP_NAME = "crossrank"
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_app(args: RerankAppArgs, *, host: str = "127.0.0.1", port: int = 8000) -> None:
    """``crossrank serve --ray``: deploy on the cluster at ``RAY_ADDRESS`` (else a local one)
    and serve until SIGINT or SIGTERM, then stop the application with :func:`stop_app` (a
    cluster keeps running).

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
        stop.clear()  # from now on, a second signal cuts the drain short
        stop_app(args.drain_seconds, cut_short=stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_app(
    drain_seconds: float, *, name: str = APP_NAME, cut_short: threading.Event | None = None
) -> None:
    """Stop the application ``name`` gracefully: every replica answers 503 (with
    ``Retry-After``) for ``drain_seconds`` (or until ``cut_short`` is set), then the
    application is deleted (Serve then lets the requests still in flight finish).

    Deleting at once would make Serve's proxy answer 404 to every request (issue 13).
    """
    logger.info("stopping: replicas answer 503 for %g s, then %r is deleted", drain_seconds, name)
    handle = serve.get_app_handle(name)
    try:
        handle.broadcast("drain").results(timeout_s=30)
    except Exception as err:  # a replica that cannot drain must not keep the app alive
        logger.warning("not every replica could be told to drain: %s", err)
    (cut_short or threading.Event()).wait(drain_seconds)
    logger.info("deleting the %r application", name)
    serve.delete(name)
