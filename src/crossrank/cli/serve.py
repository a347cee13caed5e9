"""``crossrank serve``: the rerank server, in one process or on Ray Serve (``--ray``).

The engine flags come from :mod:`crossrank.cli.common`; the server's own limits are declared
here. The server (FastAPI, uvicorn) and Ray are imported only when the command runs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Any

import typer

from crossrank.cli.common import Model, engine_command
from crossrank.errors import MissingExtraError, require_extra
from crossrank.options import DEFAULT_MODEL, EngineOptions, option_fields
from crossrank.quiet import quiet_third_party

if TYPE_CHECKING:
    from crossrank.engine import Reranker
    from crossrank.server.settings import ServerSettings

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "CROSSRANK_API_KEY"


@engine_command(skip={"normalize"})  # a request chooses probabilities or raw scores itself
def serve(
    model: Model = DEFAULT_MODEL,
    host: Annotated[
        str, typer.Option(help="Interface to bind; loopback only unless told otherwise.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar=API_KEY_ENV,
            help="Require 'Authorization: Bearer KEY' on the rerank and model routes. Prefer "
            "the environment variable: a command-line value is visible to other local users.",
            show_default=False,
        ),
    ] = None,
    max_docs: Annotated[
        int, typer.Option(min=1, help="Most documents per request (more is a 413).")
    ] = 1000,
    max_queue: Annotated[
        int, typer.Option(min=1, help="Most pairs waiting to be scored (more is a 429).")
    ] = 10_000,
    request_timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds a rerank request may take (then a 504).")
    ] = 120.0,
    served_model_name: Annotated[
        list[str] | None,
        typer.Option(
            help="Name reported as 'model' in responses, /v1/models, /info and /ready (default: "
            "the Hub id as given, or the model directory's base name; never a local path). "
            "Repeat for aliases: the first is reported, all are listed.",
            show_default=False,
        ),
    ] = None,
    timeout_header: Annotated[
        float,
        typer.Option(
            min=0.001,
            help="Seconds a client may take to send the request line and headers (also the "
            "most a new connection may stay silent); then 408 and the connection is closed.",
        ),
    ] = 10.0,
    timeout_body: Annotated[
        float,
        typer.Option(
            min=0.001, help="Seconds a client may take to send a request body; then a 408."
        ),
    ] = 60.0,
    timeout_keep_alive: Annotated[
        float,
        typer.Option(min=0.001, help="Seconds an idle keep-alive connection stays open."),
    ] = 5.0,
    limit_concurrency: Annotated[
        int,
        typer.Option(
            min=1, help="Most concurrent connections and requests (beyond it, a 503 at once)."
        ),
    ] = 1024,
    max_header_bytes: Annotated[
        int,
        typer.Option(min=256, help="Largest request line plus headers in bytes (more is a 431)."),
    ] = 16 * 1024,
    use_ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Serve with Ray Serve, one engine per replica, on the cluster at RAY_ADDRESS "
            "(else a local one); needs the ray extra.",
        ),
    ] = False,
    replicas: Annotated[
        int | None, typer.Option(min=1, help="With --ray: this many replicas (default 1).")
    ] = None,
    autoscale: Annotated[
        str | None,
        typer.Option(metavar="MIN:MAX", help="With --ray: scale between MIN and MAX replicas."),
    ] = None,
    *,
    engine: EngineOptions,
) -> None:
    """Serve a reranker over HTTP: Cohere/Jina (/v1/rerank, /v2/rerank) and TEI (/rerank)
    APIs, Prometheus /metrics, a web UI at /."""
    from crossrank.loading import set_local_model_hint

    quiet_third_party()
    set_local_model_hint("--model PATH")
    try:
        require_extra("fastapi", "server", feature="crossrank serve")
        require_extra("uvicorn", "server", feature="crossrank serve")
        if use_ray:
            require_extra("ray.serve", "ray", feature="crossrank serve --ray")
    except MissingExtraError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    settings = _settings(
        api_key,
        max_docs=max_docs,
        max_queue=max_queue,
        request_timeout=request_timeout,
        served_model_name=tuple(served_model_name or ()),
        timeout_header=timeout_header,
        timeout_body=timeout_body,
        timeout_keep_alive=timeout_keep_alive,
        limit_concurrency=limit_concurrency,
        max_header_bytes=max_header_bytes,
    )
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


def _settings(api_key: str | None, **limits: Any) -> ServerSettings:
    """The server's settings; an empty or blank key from any source is a usage error (exit 2:
    fail closed rather than serve without auth)."""
    from crossrank.server.settings import ServerSettings, api_key_from_env

    logging.getLogger("crossrank").setLevel(logging.INFO)  # show loading and readiness
    try:
        return ServerSettings(api_key=api_key_from_env(api_key), **limits)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


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
    """``serve --ray``: the same options, one engine per Ray Serve replica."""
    from pydantic import ValidationError

    from crossrank.ray import RerankAppArgs, run_app

    values = {
        "model": model,
        "replicas": replicas,
        "autoscale": autoscale,
        "api_key": settings.api_key,
        "max_docs": settings.max_docs,
        "max_queue": settings.max_queue,
        "request_timeout": settings.request_timeout,
        **{field.key: getattr(engine, field.name) for field in option_fields()},
    }
    try:
        args = RerankAppArgs.model_validate(values)
    except ValidationError as err:
        problems = "; ".join(
            ": ".join([*(".".join(map(str, e["loc"])) for _ in e["loc"][:1]), e["msg"]])
            for e in err.errors()
        )
        raise typer.BadParameter(problems) from None
    run_app(args, host=host, port=port)
