"""The FastAPI app: Cohere/Jina, Infinity and TEI-compatible rerank routes over the engine's
async path.

The HTTP layer never touches the model. Each request is validated and scored with
:meth:`Reranker.ascore_raw`, the engine's async path (score cache and chunk mode included),
which goes through its shared micro-batching queue: concurrent requests share forward passes,
passes are filled oldest request first with a bounded share each, so a large request cannot
starve small ones, and a request whose
client disconnects or whose time runs out is cancelled, so its pending pairs never reach the
model.

The model is loaded (when a factory is given) and warmed up in a background thread, so
``/health`` answers at once and ``/ready`` turns 200 only when scoring is possible.

No input may produce a 5xx (issue 13): bad input is a 4xx naming it; a request that can never
fit the queue is a 413, not a 429; a model that yields a non-finite score is a 424 (TEI's
status for a failed inference) counted in ``crossrank_nonfinite_scores_total``, never a
silent ``null``. Responses name the model by its served name, never a local path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from functools import partial
from importlib import resources
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.datastructures import Default
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException
from tokenizers import Tokenizer

from crossrank import __version__
from crossrank.batching import QueueFullError
from crossrank.engine import Reranker
from crossrank.errors import OptionError
from crossrank.server.connections import install_access_log_redaction
from crossrank.server.metrics import ServerMetrics
from crossrank.server.middleware import ApiKeyMiddleware, BodyLimitMiddleware, MetricsMiddleware
from crossrank.server.responses import (
    SafeJSONResponse,
    cohere_response,
    infinity_response,
    tei_predictions,
    tei_ranks,
)
from crossrank.server.schemas import (
    AnyRerankRequest,
    ErrorBody,
    InfinityModelCard,
    InfinityModelList,
    InfinityRerankResponse,
    ModelCard,
    ModelList,
    PredictInputError,
    RerankRequest,
    RerankResponse,
    TEIClassifier,
    TEIErrorBody,
    TEIInfo,
    TEIModelType,
    TEIPrediction,
    TEIPredictRequest,
    TEIRank,
    TEIRerankRequest,
)
from crossrank.server.settings import ServerSettings
from crossrank.tokenization import PairTokenizer
from crossrank.validation import check_query, scrub_surrogates

logger = logging.getLogger(__name__)

RerankerSource = Reranker | Callable[[], Reranker]
"""A loaded :class:`Reranker` (the caller keeps ownership) or a factory the app calls."""

CLIENT_CLOSED_REQUEST = 499  # nginx's code for "client went away"; it is never delivered
#: TEI's status for a failed inference; used for a non-finite model score.
MODEL_FAULT = 424

_PROTECTED = (
    "/v1/rerank",
    "/v2/rerank",
    "/rerank",
    "/predict",
    "/v1/models",
    "/models",
    "/info",
)
_TEI_PATHS = ("/predict", "/info")
_STATUSES = (400, 401, 408, 413, 422, 424, 429, 503, 504)
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in _STATUSES}
_TEI_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": TEIErrorBody} for code in _STATUSES}
#: TEI's ``error_type`` for each status crossrank answers with.
_TEI_ERROR_TYPES = {424: "backend", 429: "overloaded", 503: "unhealthy", 504: "backend"}
T = TypeVar("T")


class _ModelState:
    """The reranker once loaded and warmed up, or why it is not."""

    def __init__(
        self,
        source: RerankerSource,
        settings: ServerSettings,
        metrics: ServerMetrics,
        on_load_error: Callable[[BaseException], None] | None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.source = source
        self.settings = settings
        self.metrics = metrics
        self.on_load_error = on_load_error
        self.on_ready = on_ready
        self.reranker: Reranker | None = None
        self.error: BaseException | None = None
        #: Set when the server is about to stop: everything that needs the model answers 503.
        self.draining = False
        self._unsubscribe: Callable[[], None] | None = None
        self._left_cutter: _LeftCutter | None = None
        self._left_lock = threading.Lock()

    @property
    def model_name(self) -> str:
        """The served name: never a local path (see :meth:`ServerSettings.served_name`)."""
        assert self.reranker is not None
        return self.settings.served_name(self.reranker.model_name)

    @property
    def served_names(self) -> list[str]:
        """Every name the model is served under, the reported one first."""
        return list(self.settings.served_model_name) or [self.model_name]

    def left_cutter(self, reranker: Reranker) -> _LeftCutter:
        """The cutter for TEI's ``truncation_direction: Left`` (built on first use)."""
        with self._left_lock:
            if self._left_cutter is None:
                self._left_cutter = _LeftCutter(reranker.tokenizer)
            return self._left_cutter

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
            if self.on_ready is not None:
                self.on_ready()
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
        self.metrics.track_fast_path(reranker.self_check, lambda: reranker.rescored_batches)
        self.metrics.ready.set(1)
        self.reranker = reranker
        logger.info("ready: serving %s", self.model_name)

    def _failed(self, err: BaseException) -> None:
        self.error = err
        logger.error("the model failed to load: %s", err)
        if self.on_load_error is not None:
            self.on_load_error(err)

    def close(self) -> None:
        self.draining = True
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

    def require(self, *, public: bool = False) -> Reranker:
        """The ready reranker, or a 503 (with ``Retry-After``) saying why there is none."""
        if self.reranker is not None and not self.draining:
            return self.reranker
        raise HTTPException(
            503,
            self.why_not_ready(public=public),
            headers={"Retry-After": str(self.settings.retry_after)},
        )

    def why_not_ready(self, *, public: bool = False) -> str:
        """Why there is no reranker; ``public`` (``/ready``, which needs no key) leaves out
        the load error, which may name local paths (it is in the server log)."""
        if self.draining:
            return "the server is shutting down; retry, another instance may answer"
        if self.error is None:
            return "the model is loading; retry when GET /ready answers 200"
        if public:
            return "the model failed to load; the server log has the reason"
        return f"the model failed to load: {self.error}"


class _LeftCutter:
    """Cuts texts from the left so that each pair with the query fits ``max_length`` (TEI's
    ``truncation_direction: "Left"``: a text keeps its last tokens).

    It owns a copy of the Rust tokenizer: the engine's is shared and keeps truncation state.
    """

    def __init__(self, tokenizer: PairTokenizer) -> None:
        self.pair = tokenizer
        self._tokenizer = Tokenizer.from_str(tokenizer.tokenizer.backend_tokenizer.to_str())
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    def cut(self, query: str, texts: list[str], instruction: str | None) -> list[str]:
        """``texts`` cut for pairs with ``query`` (and a checked prompt ``instruction``)."""
        texts = scrub_surrogates(texts)
        encodings = self._tokenizer.encode_batch(
            scrub_surrogates([query]) + texts, add_special_tokens=False
        )
        query_tokens = min(len(encodings[0].ids), self.pair.query_max_length)
        room = self.pair.max_length - self.pair.template_tokens(instruction) - query_tokens
        return [
            text[enc.offsets[-room][0] :] if len(enc.ids) > room else text
            for text, enc in zip(texts, encodings[1:], strict=True)
        ]


def create_app(
    reranker_or_factory: RerankerSource,
    settings: ServerSettings | None = None,
    *,
    on_load_error: Callable[[BaseException], None] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> FastAPI:
    """Build the server app around a reranker (or a factory called in a background thread).

    ``on_load_error`` is called (on the event loop) when the factory or warm-up fails; the
    command-line runner uses it to exit instead of serving 503s forever. ``on_ready`` is
    called (on the loading thread) once the model is loaded and warmed up, before ``/ready``
    turns 200; the runner freezes the process's heap there.
    """
    settings = settings or ServerSettings()
    metrics = ServerMetrics()
    state = _ModelState(reranker_or_factory, settings, metrics, on_load_error, on_ready)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        install_access_log_redaction()
        state.start_loading()
        try:
            yield
        finally:
            state.close()

    app = FastAPI(
        title="crossrank",
        version=__version__,
        summary="Cross-encoder reranking with Cohere, Jina, Infinity and TEI compatible routes.",
        lifespan=lifespan,
        # A default (not a plain class): FastAPI then serializes response models straight to
        # JSON in pydantic-core (their texts are scrubbed, ``responses``), and only other
        # bodies go through SafeJSONResponse: 0.09 ms less per 1x50 response (2-core CPU).
        default_response_class=Default(SafeJSONResponse),
    )
    app.state.crossrank = state
    _add_error_handlers(app)
    _add_probe_routes(app, state, metrics)
    _add_rerank_routes(app, state, settings)
    _add_tei_routes(app, state, settings)
    app.add_middleware(
        BodyLimitMiddleware, limit=settings.max_body_bytes, timeout=settings.timeout_body
    )
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key, protected=_PROTECTED)
    routes = frozenset(getattr(route, "path", "") for route in app.routes)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=routes)  # outermost
    return app


def start_draining(app: FastAPI) -> None:
    """From now on, answer 503 (with ``Retry-After``) on ``/ready`` and on every route that
    needs the model, as after the app's shutdown: for a server about to be stopped, so that
    load balancers take it out while its in-flight requests finish (``crossrank serve
    --ray`` calls it on every replica before deleting the application)."""
    state: _ModelState = app.state.crossrank
    state.draining = True
    state.metrics.ready.set(0)
    logger.info("draining: new requests get 503 until the server stops")


def _add_probe_routes(app: FastAPI, state: _ModelState, metrics: ServerMetrics) -> None:
    page = resources.files("crossrank.server").joinpath("static/index.html").read_text("utf-8")

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health", summary="The process is alive")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="The model is loaded and warmed up", responses=_ERRORS)
    async def ready() -> dict[str, Any]:
        reranker = state.require(public=True)
        body: dict[str, Any] = {"status": "ready", "model": state.model_name}
        if reranker.self_check is not None:  # the fast runner's check at load, when one ran
            body["self_check"] = reranker.self_check.as_dict()
        return body

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", summary="The served model (OpenAI style)", responses=_ERRORS)
    async def models() -> ModelList:
        state.require()
        return ModelList(data=[ModelCard(id=name) for name in state.served_names])

    started = int(time.time())

    @app.get("/models", summary="The served model (Infinity style)", responses=_ERRORS)
    async def infinity_models() -> InfinityModelList:
        state.require()
        return InfinityModelList(
            data=[InfinityModelCard(id=name, created=started) for name in state.served_names]
        )


def _add_rerank_routes(app: FastAPI, state: _ModelState, settings: ServerSettings) -> None:
    def cohere(version: str) -> Callable[..., Awaitable[Any]]:
        async def route(body: RerankRequest, request: Request) -> Any:
            scored = await _score_documents(body, request, state, settings)
            if scored is None:
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            texts, raw, tokens = scored
            return cohere_response(body, texts, raw, tokens, state.model_name, version)

        return route

    for version in ("1", "2"):
        app.post(
            f"/v{version}/rerank",
            summary=f"Rerank documents (Cohere v{version} / Jina API)",
            response_model=RerankResponse,
            response_model_exclude_none=True,
            responses=_ERRORS,
        )(cohere(version))

    @app.post(
        "/rerank",
        summary="Rerank documents: Infinity body (documents), or Hugging Face TEI body (texts)",
        response_model=InfinityRerankResponse | list[TEIRank],
        response_model_exclude_none=True,
        responses=_ERRORS,
    )
    async def rerank(body: AnyRerankRequest, request: Request) -> Any:
        if isinstance(body, TEIRerankRequest):
            return await _tei_rerank(body, request, state, settings)
        scored = await _score_documents(body, request, state, settings)
        if scored is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        texts, raw, tokens = scored
        return infinity_response(body, texts, raw, tokens, state.model_name)


def _add_tei_routes(app: FastAPI, state: _ModelState, settings: ServerSettings) -> None:
    @app.get("/info", summary="The served model and limits (TEI)", responses=_TEI_ERRORS)
    async def info(request: Request) -> TEIInfo:
        request.state.tei = True
        reranker = state.require()
        labels = ["LABEL_0"] if reranker.num_labels == 1 else ["LABEL_0", "LABEL_1"]
        return TEIInfo(
            model_id=state.model_name,
            model_dtype=str(reranker.dtype).removeprefix("torch."),
            model_type=TEIModelType(
                reranker=TEIClassifier(
                    id2label={str(i): label for i, label in enumerate(labels)},
                    label2id={label: i for i, label in enumerate(labels)},
                )
            ),
            max_concurrent_requests=settings.limit_concurrency,
            max_input_length=reranker.tokenizer.max_length,
            max_batch_tokens=reranker.batch_tokens,
            max_client_batch_size=settings.max_docs,
            tokenization_workers=1,
            version=__version__,
        )

    @app.post(
        "/predict",
        summary="Score (query, text) pairs (TEI predict)",
        response_model=list[TEIPrediction] | list[list[TEIPrediction]],
        responses=_TEI_ERRORS,
    )
    async def predict(body: TEIPredictRequest, request: Request) -> Any:
        request.state.tei = True
        return await _tei_predict(body, request, state, settings)


async def _score_documents(
    body: RerankRequest, request: Request, state: _ModelState, settings: ServerSettings
) -> tuple[list[str], np.ndarray, int] | None:
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
        instruction=body.instruction,
    )
    return None if scored is None else (texts, *scored)


async def _tei_rerank(
    body: TEIRerankRequest, request: Request, state: _ModelState, settings: ServerSettings
) -> Any:
    request.state.tei = True
    scored = await _score(
        request,
        state,
        settings,
        body.query,
        body.texts,
        field="texts",
        max_doc_tokens=None,
        refuse_truncation=body.truncate is False,
        cut_left=body.truncation_direction.lower() == "left",
        instruction=body.instruction,
    )
    if scored is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    raw, _ = scored
    return tei_ranks(body.texts, raw, raw_scores=body.raw_scores, return_text=body.return_text)


async def _tei_predict(
    body: TEIPredictRequest, request: Request, state: _ModelState, settings: ServerSettings
) -> Any:
    reranker = state.require()
    try:
        pairs, batch = body.pairs()
        if not pairs:
            raise ValueError("inputs must not be empty")
        for i, (query, _) in enumerate(pairs):
            check_query(query, name=f"inputs[{i}][0]" if batch else "inputs[0]")
    except PredictInputError as err:
        raise HTTPException(422, str(err)) from None
    except ValueError as err:
        raise HTTPException(400, str(err)) from None
    _check_count(len(pairs), settings, "inputs")
    instruction = _checked_instruction(reranker, body.instruction)
    queries, texts = [q for q, _ in pairs], [t for _, t in pairs]
    raw = await _guarded(
        request,
        settings,
        lambda: reranker.ascore_pairs(pairs, normalize=False, instruction=instruction),
        lambda: _rows_needed(reranker, queries, texts, None, instruction),
        field="inputs",
    )
    if raw is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    _check_finite(raw, "inputs", state.metrics)
    label = "LABEL_0" if reranker.num_labels == 1 else "LABEL_1"
    predictions = tei_predictions(raw, raw_scores=body.raw_scores, label=label)
    return predictions if batch else predictions[0]


def _checked_instruction(reranker: Reranker, instruction: str | None) -> str | None:
    """A request's ``instruction``, checked against the served model before any scoring
    (:meth:`~crossrank.tokenization.PairTokenizer.check_instruction`: ``None`` for the
    model's own); a 422 naming it when the model has no prompt or it leaves no room."""
    try:
        return reranker.tokenizer.check_instruction(instruction)
    except OptionError as err:
        raise HTTPException(422, str(err)) from None


def _check_count(count: int, settings: ServerSettings, field: str) -> None:
    if not count:
        raise HTTPException(400, f"{field} must not be empty")
    if count > settings.max_docs:
        raise HTTPException(
            413,
            f"{field} has {count} items, more than this server's limit of "
            f"{settings.max_docs} (--max-docs)",
        )


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
    cut_left: bool = False,
    instruction: str | None = None,
) -> tuple[np.ndarray, int] | None:
    """Raw scores of ``texts`` (request order) and the tokens scored; ``None`` when the client
    disconnected first. Limits, readiness and the instruction are checked before any
    tokenization of the texts."""
    reranker = state.require()
    try:
        check_query(query)
    except ValueError as err:
        raise HTTPException(400, str(err)) from None
    _check_count(len(texts), settings, field)
    instruction = _checked_instruction(reranker, instruction)
    cut_left = cut_left and not reranker.long_docs.chunked  # chunk mode never cuts a text

    async def work() -> tuple[np.ndarray, int]:
        if refuse_truncation:
            await _refuse_overlong(reranker, query, texts, field, instruction)
        scored_texts = texts
        if cut_left:
            loop = asyncio.get_running_loop()
            scored_texts = await loop.run_in_executor(
                None, lambda: state.left_cutter(reranker).cut(query, texts, instruction)
            )
        return await reranker.ascore_raw(
            query, scored_texts, max_doc_tokens=max_doc_tokens, instruction=instruction
        )

    queries = [query] * len(texts)
    scored = await _guarded(
        request,
        settings,
        work,
        lambda: _rows_needed(reranker, queries, texts, max_doc_tokens, instruction),
        field=field,
    )
    if scored is not None:
        _check_finite(scored[0], field, state.metrics)
    return scored


async def _guarded(
    request: Request,
    settings: ServerSettings,
    work: Callable[[], Awaitable[T]],
    rows_needed: Callable[[], Awaitable[int]],
    *,
    field: str,
) -> T | None:
    """Run ``work`` under the request timeout; ``None`` if the client left first (``work``
    is then cancelled). Maps the engine's refusals to statuses: queue full (429, or 413 when
    the request alone needs more rows than the queue holds) and timeout (504)."""
    try:
        return await _unless_disconnected(
            request, asyncio.wait_for(work(), settings.request_timeout)
        )
    except QueueFullError as err:
        needed = await asyncio.wait_for(rows_needed(), settings.request_timeout)
        if needed > settings.max_queue:
            raise HTTPException(
                413,
                f"{field} needs {needed} pairs scored (a long document counts one per window), "
                f"more than this server's queue limit of {settings.max_queue} (--max-queue); "
                "send fewer or shorter documents",
            ) from None
        retry = {"Retry-After": str(settings.retry_after)}
        raise HTTPException(429, f"server busy, retry later: {err}", headers=retry) from None
    except asyncio.TimeoutError:
        raise HTTPException(
            504,
            f"scoring took longer than this server's limit of {settings.request_timeout} s "
            "(--request-timeout)",
        ) from None


async def _rows_needed(
    reranker: Reranker,
    queries: list[str],
    texts: list[str],
    max_doc_tokens: int | None,
    instruction: str | None,
) -> int:
    """How many rows (pairs, or windows in chunk mode) scoring these pairs takes."""

    def count() -> int:
        docs = texts
        if max_doc_tokens is not None:
            docs = reranker.tokenizer.cap_documents(docs, max_doc_tokens)
        return len(reranker.encode(queries, docs, instruction=instruction))

    return await asyncio.get_running_loop().run_in_executor(None, count)


def _check_finite(raw: np.ndarray, field: str, metrics: ServerMetrics) -> None:
    """A 424 naming the first item whose score is NaN or infinite: a fault of the model or
    the device (overflow in half precision, broken weights), never sent as ``null``."""
    bad = np.flatnonzero(~np.isfinite(raw))
    if not len(bad):
        return
    metrics.nonfinite_scores.inc(len(bad))
    logger.error("the model produced %d non-finite scores of %d", len(bad), len(raw))
    raise HTTPException(
        MODEL_FAULT,
        f"the model produced a non-finite score for {field}[{int(bad[0])}] ({len(bad)} of "
        f"{len(raw)} scores): a fault of the model or its device, not of the request",
    )


async def _refuse_overlong(
    reranker: Reranker, query: str, texts: list[str], field: str, instruction: str | None
) -> None:
    """413 naming the query, or the first text, that would be truncated (TEI
    ``truncate: false``); the engine says which (:meth:`Reranker.first_overlong`)."""
    loop = asyncio.get_running_loop()
    overlong = partial(reranker.first_overlong, query, texts, instruction=instruction)
    try:
        index = await loop.run_in_executor(None, overlong)
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
    def error(
        request: Request, status: int, message: str, detail: Any = None, **kw: Any
    ) -> JSONResponse:
        body: dict[str, Any] = {"message": message, "detail": message if detail is None else detail}
        if _is_tei(request):
            error_type = _TEI_ERROR_TYPES.get(status, "validation")
            body = {"error": message, "error_type": error_type, **body}
        return SafeJSONResponse(body, status_code=status, **kw)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if isinstance(exc.body, dict) and "texts" in exc.body:
            request.state.tei = True
        message = "; ".join(_describe(e) for e in errors[:5])
        detail = [{k: e.get(k) for k in ("loc", "msg", "type")} for e in errors]
        return error(request, 422, message, detail)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(request, exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request to %s failed", request.url.path)
        return error(request, 500, "internal server error; the server log has the details")


def _is_tei(request: Request) -> bool:
    """Whether the request is a TEI one: its errors then use TEI's body shape."""
    return request.url.path in _TEI_PATHS or bool(getattr(request.state, "tei", False))


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
