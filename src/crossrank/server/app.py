"""The FastAPI app: Cohere/Jina/TEI-compatible rerank routes over the engine's async path.

The HTTP layer never touches the model. Each request is validated and scored with
:meth:`Reranker.ascore_raw`, the engine's async path (score cache and chunk mode included),
which goes through its shared micro-batching queue: concurrent requests share forward passes,
pairs are taken round-robin so a large request cannot starve small ones, and a request whose
client disconnects or whose time runs out is cancelled, so its pending pairs never reach the
model.

The model is loaded (when a factory is given) and warmed up in a background thread, so
``/health`` answers at once and ``/ready`` turns 200 only when scoring is possible.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from importlib import resources
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from crossrank import __version__
from crossrank.batching import QueueFullError
from crossrank.engine import Reranker
from crossrank.result import sigmoid, to_results
from crossrank.server.metrics import ServerMetrics
from crossrank.server.middleware import ApiKeyMiddleware, BodyLimitMiddleware, MetricsMiddleware
from crossrank.server.schemas import (
    AnyRerankRequest,
    DocumentText,
    ErrorBody,
    ModelCard,
    ModelList,
    RerankRequest,
    RerankResponse,
    RerankResultItem,
    TEIRank,
    TEIRerankRequest,
    Usage,
)
from crossrank.server.settings import ServerSettings
from crossrank.validation import check_query

logger = logging.getLogger(__name__)

RerankerSource = Reranker | Callable[[], Reranker]
"""A loaded :class:`Reranker` (the caller keeps ownership) or a factory the app calls."""

CLIENT_CLOSED_REQUEST = 499  # nginx's code for "client went away"; it is never delivered

_PROTECTED = ("/v1/rerank", "/v2/rerank", "/rerank", "/v1/models")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 413, 422, 429, 503, 504)
}
T = TypeVar("T")


class _ModelState:
    """The reranker once loaded and warmed up, or why it is not."""

    def __init__(
        self,
        source: RerankerSource,
        settings: ServerSettings,
        metrics: ServerMetrics,
        on_load_error: Callable[[BaseException], None] | None,
    ) -> None:
        self.source = source
        self.settings = settings
        self.metrics = metrics
        self.on_load_error = on_load_error
        self.reranker: Reranker | None = None
        self.error: BaseException | None = None
        self._unsubscribe: Callable[[], None] | None = None

    @property
    def model_name(self) -> str:
        assert self.reranker is not None
        return self.settings.model_name or self.reranker.model_name

    def start_loading(self) -> None:
        """Load and warm up in a daemon thread (a slow load never blocks start or shutdown)."""
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=self._load, args=(loop,), name="crossrank-load", daemon=True
        ).start()

    def _load(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            source = self.source
            reranker = source if isinstance(source, Reranker) else source()
            reranker.warmup()
        except Exception as err:
            with contextlib.suppress(RuntimeError):  # the loop closed during a slow load
                loop.call_soon_threadsafe(self._failed, err)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._activate, reranker)

    def _activate(self, reranker: Reranker) -> None:
        batcher = reranker.batcher(self.settings.max_queue)
        self._unsubscribe = reranker.subscribe(self.metrics.observe_batch)
        self.metrics.track_queue(lambda: batcher.pending_pairs)
        self.metrics.track_cache(lambda: reranker.cache_stats)
        self.metrics.ready.set(1)
        self.reranker = reranker
        logger.info("ready: serving %s", self.model_name)

    def _failed(self, err: BaseException) -> None:
        self.error = err
        logger.error("the model failed to load: %s", err)
        if self.on_load_error is not None:
            self.on_load_error(err)

    def close(self) -> None:
        reranker = self.reranker
        self.reranker = None
        self.metrics.ready.set(0)
        if reranker is None:
            return
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if not isinstance(self.source, Reranker):  # we built it, so we stop its worker
            reranker.close()

    def require(self) -> Reranker:
        """The ready reranker, or a 503 saying why there is none."""
        if self.reranker is not None:
            return self.reranker
        if self.error is not None:
            message = f"the model failed to load: {self.error}"
        else:
            message = "the model is loading; retry when GET /ready answers 200"
        raise HTTPException(503, message, headers={"Retry-After": str(self.settings.retry_after)})


def create_app(
    reranker_or_factory: RerankerSource,
    settings: ServerSettings | None = None,
    *,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """Build the server app around a reranker (or a factory called in a background thread).

    ``on_load_error`` is called (on the event loop) when the factory or warm-up fails; the
    command-line runner uses it to exit instead of serving 503s forever.
    """
    settings = settings or ServerSettings()
    metrics = ServerMetrics()
    state = _ModelState(reranker_or_factory, settings, metrics, on_load_error)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start_loading()
        try:
            yield
        finally:
            state.close()

    app = FastAPI(
        title="crossrank",
        version=__version__,
        summary="Cross-encoder reranking with Cohere, Jina and TEI compatible routes.",
        lifespan=lifespan,
    )
    app.state.crossrank = state
    _add_error_handlers(app)
    _add_routes(app, state, settings, metrics)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key, protected=_PROTECTED)
    routes = frozenset(getattr(route, "path", "") for route in app.routes)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=routes)  # outermost
    return app


def _add_routes(
    app: FastAPI, state: _ModelState, settings: ServerSettings, metrics: ServerMetrics
) -> None:
    page = resources.files("crossrank.server").joinpath("static/index.html").read_text("utf-8")

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health", summary="The process is alive")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="The model is loaded and warmed up", responses=_ERRORS)
    async def ready() -> dict[str, str]:
        state.require()
        return {"status": "ready", "model": state.model_name}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", summary="The served model", responses=_ERRORS)
    async def models() -> ModelList:
        state.require()
        return ModelList(data=[ModelCard(id=state.model_name)])

    async def cohere(body: RerankRequest, request: Request) -> RerankResponse:
        return await _cohere_rerank(body, request, state, settings)

    for path in ("/v1/rerank", "/v2/rerank"):
        app.post(
            path,
            summary="Rerank documents (Cohere / Jina API)",
            response_model_exclude_none=True,
            responses=_ERRORS,
        )(cohere)

    @app.post(
        "/rerank",
        summary="Rerank documents (Cohere / Jina body, or Hugging Face TEI body with texts)",
        response_model=RerankResponse | list[TEIRank],
        response_model_exclude_none=True,
        responses=_ERRORS,
    )
    async def rerank(body: AnyRerankRequest, request: Request) -> Any:
        if isinstance(body, TEIRerankRequest):
            return await _tei_rerank(body, request, state, settings)
        return await _cohere_rerank(body, request, state, settings)


async def _cohere_rerank(
    body: RerankRequest, request: Request, state: _ModelState, settings: ServerSettings
) -> Any:
    texts = body.texts()
    scored = await _score(
        request,
        state,
        settings,
        body.query,
        texts,
        field="documents",
        max_doc_tokens=body.max_tokens_per_doc,
        refuse_truncation=False,
    )
    if scored is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    raw, tokens = scored
    results = [
        RerankResultItem(
            index=r.index,
            relevance_score=r.score,
            raw_score=float(raw[r.index]) if body.return_raw_scores else None,
            document=DocumentText(text=r.document) if body.return_documents else None,
        )
        for r in to_results(texts, sigmoid(raw), top_n=body.top_n)
    ]
    return RerankResponse(
        id=str(uuid.uuid4()),
        model=state.model_name,
        results=results,
        usage=Usage(total_tokens=tokens),
    )


async def _tei_rerank(
    body: TEIRerankRequest, request: Request, state: _ModelState, settings: ServerSettings
) -> Any:
    scored = await _score(
        request,
        state,
        settings,
        body.query,
        body.texts,
        field="texts",
        max_doc_tokens=None,
        refuse_truncation=body.truncate is False,
    )
    if scored is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    raw, _ = scored
    scores = raw if body.raw_scores else sigmoid(raw)
    return [
        TEIRank(index=r.index, score=r.score, text=r.document if body.return_text else None)
        for r in to_results(body.texts, scores)
    ]


async def _score(
    request: Request,
    state: _ModelState,
    settings: ServerSettings,
    query: str,
    texts: list[str],
    *,
    field: str,
    max_doc_tokens: int | None,
    refuse_truncation: bool,
) -> tuple[np.ndarray, int] | None:
    """Raw scores of ``texts`` (request order) and the tokens scored; ``None`` when the client
    disconnected first. Limits and readiness are checked before any tokenization."""
    reranker = state.require()
    try:
        check_query(query)
    except ValueError as err:
        raise HTTPException(400, str(err)) from None
    if not texts:
        raise HTTPException(400, f"{field} must not be empty")
    if len(texts) > settings.max_docs:
        raise HTTPException(
            413,
            f"{field} has {len(texts)} items, more than this server's limit of "
            f"{settings.max_docs} (--max-docs)",
        )

    async def work() -> tuple[np.ndarray, int]:
        if refuse_truncation:
            await _refuse_overlong(reranker, query, texts, field)
        return await reranker.ascore_raw(query, texts, max_doc_tokens=max_doc_tokens)

    try:
        return await _unless_disconnected(
            request, asyncio.wait_for(work(), settings.request_timeout)
        )
    except QueueFullError as err:
        retry = {"Retry-After": str(settings.retry_after)}
        raise HTTPException(429, f"server busy, retry later: {err}", headers=retry) from None
    except asyncio.TimeoutError:
        raise HTTPException(
            504,
            f"scoring took longer than this server's limit of {settings.request_timeout} s "
            "(--request-timeout)",
        ) from None


async def _refuse_overlong(reranker: Reranker, query: str, texts: list[str], field: str) -> None:
    """413 naming the query, or the first text, that would be truncated (TEI
    ``truncate: false``); the engine says which (:meth:`Reranker.first_overlong`)."""
    loop = asyncio.get_running_loop()
    try:
        index = await loop.run_in_executor(None, reranker.first_overlong, query, texts)
    except ValueError as err:  # the query itself would be cut
        raise HTTPException(413, f"{err}; send truncate: true to truncate it") from None
    if index is not None:
        raise HTTPException(
            413,
            f"{field}[{index}] makes a pair longer than max_length={reranker.max_length} "
            "tokens with the query; send truncate: true to truncate it",
        )


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """Run ``work``; cancel it and return ``None`` if the client disconnects first.

    FastAPI has read the whole body by now, so the next ASGI message can only be the
    disconnect; cancelling ``work`` drops its pairs that are still queued.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        logger.info("client disconnected; its request was cancelled")
        return None
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _add_error_handlers(app: FastAPI) -> None:
    def error(status: int, message: str, detail: Any = None, **kw: Any) -> JSONResponse:
        body = {"message": message, "detail": message if detail is None else detail}
        return JSONResponse(body, status_code=status, **kw)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        message = "; ".join(_describe(e) for e in errors[:5])
        return error(422, message, [{k: e.get(k) for k in ("loc", "msg", "type")} for e in errors])

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request to %s failed", request.url.path)
        return error(500, "internal server error; the server log has the details")


def _describe(error: Any) -> str:
    """``documents[3]: Input should be a valid string`` from a pydantic error dict."""
    if error.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({error.get('ctx', {}).get('error', '')})"
    where = ""
    for part in error.get("loc", ()):
        if part in ("body", "tei", "cohere"):
            continue
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    message = str(error.get("msg", "invalid value"))
    return f"{where}: {message}" if where else message
