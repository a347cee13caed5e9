"""``crossrank serve``: the rerank server, in one process or on Ray Serve (``--ray``).

The engine flags are generated from :class:`~crossrank.options.EngineOptions` and the server
flags (API key, limits, timeouts, served names) from
:class:`~crossrank.server.settings.ServerSettings`, both by :mod:`crossrank.cli.common`; only
the binding and the Ray flags are declared here. The server (FastAPI, uvicorn) and Ray are
imported only when the command runs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Any

import typer

from crossrank.cli.common import FlagGroup, Model, engine_command, flags_command
from crossrank.errors import MissingExtraError, OptionError, require_extra
from crossrank.options import DEFAULT_MODEL, EngineOptions, option_fields
from crossrank.quiet import quiet_third_party
from crossrank.server.settings import ServerSettings, api_key_from_env

if TYPE_CHECKING:
    from crossrank.engine import Reranker

_LOOPBACK = ("127.0.0.1", "localhost", "::1")

Host = Annotated[str, typer.Option(help="Interface to bind; loopback only unless told otherwise.")]
Port = Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")]
UseRay = Annotated[
    bool,
    typer.Option(
        "--ray",
        help="Serve with Ray Serve, one engine per replica, on the cluster at RAY_ADDRESS "
        "(else a local one); needs the ray extra.",
    ),
]
Replicas = Annotated[
    int | None, typer.Option(min=1, help="With --ray: this many replicas (default 1).")
]
Autoscale = Annotated[
    str | None,
    typer.Option(metavar="MIN:MAX", help="With --ray: scale between MIN and MAX replicas."),
]


def _settings(**values: Any) -> ServerSettings:
    """The server's settings, the API key also from ``$CROSSRANK_API_KEY``: an empty or blank
    key from any source is a usage error (fail closed rather than serve without auth)."""
    return ServerSettings(**{**values, "api_key": api_key_from_env(values["api_key"])})


#: One flag per field of :class:`ServerSettings` (``--api-key``, ``--max-docs`` ...).
SERVER_FLAGS = FlagGroup("settings", tuple(option_fields(ServerSettings)), _settings)


@engine_command(skip={"normalize"})  # a request chooses probabilities or raw scores itself
@flags_command(SERVER_FLAGS)
def serve(
    model: Model = DEFAULT_MODEL,
    host: Host = "127.0.0.1",
    port: Port = 8000,
    use_ray: UseRay = False,
    replicas: Replicas = None,
    autoscale: Autoscale = None,
    *,
    settings: ServerSettings,
    engine: EngineOptions,
) -> None:
    """Serve a reranker over HTTP: Cohere/Jina (/v1/rerank, /v2/rerank) and TEI (/rerank)
    APIs, Prometheus /metrics, a web UI at /."""
    from crossrank.loading import set_local_model_hint

    quiet_third_party()
    set_local_model_hint("--model PATH")
    _require_extras(use_ray)
    logging.getLogger("crossrank").setLevel(logging.INFO)  # show loading and readiness
    _warn_if_open(host, settings.api_key)
    if use_ray:
        _serve_on_ray(model, host, port, replicas, autoscale, settings, engine)
        return
    if replicas is not None or autoscale is not None:
        raise typer.BadParameter("--replicas and --autoscale need --ray")
    from crossrank.server import runner

    def load() -> Reranker:
        from crossrank.engine import Reranker

        return Reranker(model, engine)

    code = runner.run_server(load, settings, host=host, port=port)
    if code:
        raise typer.Exit(code)


def _require_extras(use_ray: bool) -> None:
    """Stop (exit 1) with one line naming the extra to install when one is missing."""
    try:
        require_extra("fastapi", "server", feature="crossrank serve")
        require_extra("uvicorn", "server", feature="crossrank serve")
        if use_ray:
            require_extra("ray.serve", "ray", feature="crossrank serve --ray")
    except MissingExtraError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


def _warn_if_open(host: str, api_key: str | None) -> None:
    if host not in _LOOPBACK and api_key is None:
        logging.getLogger(__name__).warning(
            "binding %s without an API key: anyone who can reach this port can use the server",
            host,
        )


def _serve_on_ray(
    model: str,
    host: str,
    port: int,
    replicas: int | None,
    autoscale: str | None,
    settings: ServerSettings,
    engine: EngineOptions,
) -> None:
    """``serve --ray``: the same options, one engine per Ray Serve replica. A setting that a
    replica cannot apply (a connection limit: Ray's proxy holds the connections) is a usage
    error naming its flag when it is not at its default, never dropped."""
    from pydantic import ValidationError

    from crossrank.ray import RerankAppArgs, run_app

    try:
        args = RerankAppArgs.from_options(
            settings, engine, model=model, replicas=replicas, autoscale=autoscale
        )
    except OptionError as err:
        raise SERVER_FLAGS.usage_error(err) from None
    except ValidationError as err:
        problems = "; ".join(
            ": ".join([*(".".join(map(str, e["loc"])) for _ in e["loc"][:1]), e["msg"]])
            for e in err.errors()
        )
        raise typer.BadParameter(problems) from None
    run_app(args, host=host, port=port)
