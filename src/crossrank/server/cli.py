"""``crossrank serve``: the rerank server's command (registered on the main typer app)."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

import typer

from crossrank.engine import DEFAULT_MODEL, Reranker, check_options
from crossrank.loading import set_local_model_hint
from crossrank.options import Aggregate, Backend, LongDocsMode
from crossrank.quiet import quiet_third_party

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: Engine parameters whose command-line option is not ``--`` plus the dashed name.
_FLAGS = {"batch_tokens": "--max-batch-tokens"}


def serve(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Hugging Face model id or local directory.")
    ] = DEFAULT_MODEL,
    host: Annotated[
        str, typer.Option(help="Interface to bind; loopback only unless told otherwise.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="CROSSRANK_API_KEY",
            help="Require 'Authorization: Bearer KEY' on the rerank and model routes. Prefer "
            "the environment variable: a command-line value is visible to other local users.",
            show_default=False,
        ),
    ] = None,
    max_docs: Annotated[
        int, typer.Option(min=1, help="Most documents per request (more is a 413).")
    ] = 1000,
    max_batch_tokens: Annotated[
        int | None,
        typer.Option(min=8, help="Tokens per forward pass, padding included (default: by device)."),
    ] = None,
    max_queue: Annotated[
        int, typer.Option(min=1, help="Most pairs waiting to be scored (more is a 429).")
    ] = 10_000,
    request_timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds a rerank request may take (then a 504).")
    ] = 120.0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, float16, bfloat16.")] = "auto",
    max_length: Annotated[
        int, typer.Option(min=8, help="Most tokens per (query, document) pair.")
    ] = 512,
    query_max_length: Annotated[
        int | None,
        typer.Option(
            help="Most query tokens; longer queries are cut (default: 3/4 of max length)."
        ),
    ] = None,
    long_docs: Annotated[
        LongDocsMode,
        typer.Option(
            help="A document longer than max length: keep its first tokens (truncate), or "
            "score every window of it and keep one score (chunk)."
        ),
    ] = "truncate",
    chunk_tokens: Annotated[
        int | None,
        typer.Option(help="With chunk: document tokens per window (default: all the room)."),
    ] = None,
    chunk_overlap: Annotated[
        int | None,
        typer.Option(help="With chunk: tokens shared by neighbouring windows (default: 1/8)."),
    ] = None,
    aggregate: Annotated[
        Aggregate,
        typer.Option(help="With chunk: a document's score from its windows' scores."),
    ] = "max",
    cache: Annotated[
        str | None,
        typer.Option(
            envvar="CROSSRANK_CACHE",
            metavar="memory|redis://...",
            help="Score cache: 'memory' (an LRU in each process) or a redis://, rediss:// or "
            "unix:// URL shared by several servers (entries expire after a day). Prefer the "
            "environment variable for a URL with a password.",
            show_default=False,
        ),
    ] = None,
    backend: Annotated[
        Backend,
        typer.Option(help="torch, or onnx (ONNX Runtime, CPU, float32 or int8)."),
    ] = "torch",
    quantize: Annotated[
        bool,
        typer.Option("--quantize/--no-quantize", help="With --backend onnx: dynamic int8 weights."),
    ] = False,
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
) -> None:
    """Serve a reranker over HTTP: Cohere/Jina (/v1/rerank, /v2/rerank) and TEI (/rerank)
    APIs, Prometheus /metrics, a web UI at /."""
    try:
        from crossrank.server.runner import run_server
    except ImportError as err:
        typer.echo(
            f"crossrank serve needs the server extra ({err}): pip install 'crossrank[server]'",
            err=True,
        )
        raise typer.Exit(1) from None
    from crossrank.server.settings import ServerSettings

    quiet_third_party()
    set_local_model_hint("--model PATH")
    logging.getLogger("crossrank").setLevel(logging.INFO)  # show loading and readiness
    try:
        settings = ServerSettings(
            api_key=api_key,
            max_docs=max_docs,
            max_queue=max_queue,
            request_timeout=request_timeout,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    engine: dict[str, Any] = {
        "max_length": max_length,
        "query_max_length": query_max_length,
        "batch_tokens": max_batch_tokens,
        "long_docs": long_docs,
        "chunk_tokens": chunk_tokens,
        "chunk_overlap": chunk_overlap,
        "aggregate": aggregate,
        "cache": cache,
        "backend": backend,
        "quantize": quantize,
    }
    _check_engine_options(engine)
    if host not in _LOOPBACK and api_key is None:
        logging.getLogger(__name__).warning(
            "binding %s without an API key: anyone who can reach this port can use the server",
            host,
        )

    if use_ray:
        # RerankAppArgs spells the engine's batch_tokens as the flag does: max_batch_tokens
        ray_engine = {
            ("max_batch_tokens" if k == "batch_tokens" else k): v for k, v in engine.items()
        }
        _serve_on_ray(
            host=host,
            port=port,
            model=model,
            replicas=replicas,
            autoscale=autoscale,
            device=device,
            dtype=dtype,
            max_docs=max_docs,
            max_queue=max_queue,
            request_timeout=request_timeout,
            api_key=api_key,
            **ray_engine,
        )
        return
    if replicas is not None or autoscale is not None:
        raise typer.BadParameter("--replicas and --autoscale need --ray")

    def load() -> Reranker:
        return Reranker(model, device=device, dtype=dtype, **engine)

    code = run_server(load, settings, host=host, port=port)
    if code:
        raise typer.Exit(code)


def _check_engine_options(options: dict[str, Any]) -> None:
    """The engine's own checks of the options it can judge without a model, as a usage
    error naming the command-line option (the engine's message starts with its parameter)."""
    try:
        check_options(**options)
    except ValueError as err:
        match = re.match(r"\w+", str(err))
        param = match.group() if match else ""
        hint = [_FLAGS.get(param, f"--{param.replace('_', '-')}")] if param in options else None
        raise typer.BadParameter(str(err), param_hint=hint) from None


def _serve_on_ray(*, host: str, port: int, **options: Any) -> None:
    """``serve --ray``: the same options, one engine per Ray Serve replica."""
    from pydantic import ValidationError

    from crossrank.ray import RerankAppArgs, run_app

    try:
        args = RerankAppArgs(**options)
    except ValidationError as err:
        problems = "; ".join(
            ": ".join([*(".".join(map(str, e["loc"])) for _ in e["loc"][:1]), e["msg"]])
            for e in err.errors()
        )
        raise typer.BadParameter(problems) from None
    run_app(args, host=host, port=port)
