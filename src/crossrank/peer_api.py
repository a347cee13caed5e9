"""The peers' method names on :class:`crossrank.Reranker`: a one-line swap for their users.

Users arrive with code written for sentence-transformers' ``CrossEncoder``
(``predict``, ``rank``) or FlagEmbedding's ``FlagReranker`` (``compute_score``). Replacing
the constructor line with ``Reranker(...)`` keeps that code working: :class:`PeerCompat`
gives the engine those methods with the peers' contracts (argument names, defaults, score
scale, return types), computed from the engine's raw logits. The contracts follow
sentence-transformers 6.2 ``CrossEncoder.predict``/``rank`` and FlagEmbedding's
``FlagReranker.compute_score`` (API shapes only; no code is taken from either). Parity with
both is tested on the same weights (tests/core/test_peer_api.py, CPU fp32, atol 1e-5).

Accepted but without effect: ``batch_size`` (the engine cuts batches by its token budget,
``batch_tokens``). Refused with a message: arguments that would change the scores in ways
the engine fixes at construction (``max_length``, ``device``, ``prompt_name``).

``prompt`` is the peers' per-call instruction of an LLM reranker, and becomes the engine's
``instruction=`` for a decoder model: sentence-transformers (>= 5.4) passes it to a chat
template as the system message, which its Qwen3-Reranker template renders as the
``<Instruct>:`` line (the default instruction when none is given), and FlagEmbedding's
``FlagLLMReranker.compute_score(prompt=...)`` puts it where bge-reranker-v2-gemma's prompt
goes. For an encoder cross-encoder sentence-transformers prepends ``prompt`` to the query
text instead, which crossrank leaves to the caller: it is refused there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from importlib import import_module
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from crossrank.validation import check_documents, check_optional_positive_int, check_query

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from crossrank.options import EngineOptions

logger = logging.getLogger(__name__)

#: The file in which sentence-transformers >= 5 saves a CrossEncoder's activation function.
ST_CONFIG_FILE = "config_sentence_transformers.json"


class _Engine(Protocol):
    """What the mixin uses of :class:`crossrank.Reranker` (its public API and state)."""

    model_name: str
    revision: str | None
    num_labels: int
    max_length: int
    options: EngineOptions
    model: Any
    family: Any

    score_pairs: Callable[..., np.ndarray]
    score: Callable[..., np.ndarray]


def _is_single_pair(inputs: Any) -> bool:
    """A lone ``(query, document)``: a list/tuple whose first item is not itself a pair
    (the test both peers use)."""
    return (
        isinstance(inputs, (list, tuple))
        and len(inputs) > 0
        and not isinstance(inputs[0], (list, tuple))
    )


def _pairs(inputs: Any) -> list[tuple[str, str]]:
    """``inputs`` as a list of pairs (a numpy array of strings as well)."""
    if isinstance(inputs, np.ndarray):
        inputs = inputs.tolist()
    return [tuple(p) if isinstance(p, list) else p for p in inputs]


def _refuse(name: str, value: Any, instead: str) -> None:
    if value is not None:
        raise ValueError(f"{name}={value!r} is not supported by crossrank: {instead}")


def _prompt_instruction(engine: _Engine, prompt: str | None) -> str | None:
    """A peer's ``prompt``: the call's instruction on a decoder reranker (see the module
    docstring); refused for an encoder, whose prompt a peer would prepend to the query."""
    if engine.family is None:
        _refuse(
            "prompt",
            prompt,
            "an encoder cross-encoder has no instruction (sentence-transformers prepends the "
            "prompt to the query text: put it there)",
        )
    return prompt


def _check_batch_size(batch_size: Any) -> None:
    """Accepted for compatibility and checked, but the token budget cuts the batches."""
    check_optional_positive_int(batch_size, name="batch_size")


def _activation_from_path(path: str, trust_remote_code: bool) -> Callable[..., Any] | None:
    """Instantiate ``torch.nn.Sigmoid``-style dotted paths; other modules only with
    ``trust_remote_code`` (sentence-transformers' rule)."""
    if not (path.startswith("torch.") or trust_remote_code):
        logger.warning(
            "activation function %r in the model's configuration is not trusted (build the "
            "Reranker with trust_remote_code=True to use it); using the default",
            path,
        )
        return None
    module, _, name = path.rpartition(".")
    try:
        activation: Callable[..., Any] = getattr(import_module(module), name)()
    except (ImportError, AttributeError, TypeError) as err:
        logger.warning("activation function %r cannot be built (%s); using the default", path, err)
        return None
    return activation


class PeerCompat:
    """``predict``/``rank`` (sentence-transformers ``CrossEncoder``) and ``compute_score``
    (FlagEmbedding ``FlagReranker``) over the engine's public scoring methods.

    These follow the peers' score scale, not the engine's ``normalize`` setting: ``predict``
    and ``rank`` apply the model's activation (sigmoid for a one-logit model unless its
    sentence-transformers configuration names another, e.g. ``Identity``), and
    ``compute_score`` returns raw logits unless ``normalize=True``. They are defined for
    one-logit models (the BGE rerankers, the ``cross-encoder/*`` models); a two-label model
    is refused, since the engine keeps one score per pair.
    """

    _peer_activation: Callable[..., Any] | None = None

    # ------------------------------------------------------------ sentence-transformers
    def predict(
        self: _Engine,
        inputs: Any = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        activation_fn: Callable[..., Any] | None = None,
        apply_softmax: bool | None = False,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        *,
        sentences: Any = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        device: Any = None,
    ) -> np.ndarray | torch.Tensor | list[torch.Tensor]:
        """Scores of ``[(query, document), ...]`` as ``CrossEncoder.predict`` returns them.

        ``activation_fn`` (default: the model's, sigmoid for one logit) is applied to the
        fp32 logits, e.g. ``torch.nn.Identity()`` gives the raw logits. The result is a
        float32 ``numpy`` array (default), one tensor (``convert_to_tensor=True``) or a list
        of 0-d tensors (``convert_to_numpy=False``); a single pair gives a single value.
        ``sentences`` is the name older sentence-transformers used for ``inputs``.
        ``batch_size`` is accepted and has no effect (the engine's token budget decides);
        ``apply_softmax`` has none on a one-logit model, as in sentence-transformers.
        ``prompt`` is a decoder reranker's instruction (module docstring).
        """
        if (inputs is None) == (sentences is None):
            raise TypeError("predict() takes the pairs as inputs (or sentences), exactly once")
        inputs = sentences if inputs is None else inputs
        _check_batch_size(batch_size)
        _refuse(
            "prompt_name",
            prompt_name,
            "crossrank keeps no named prompts: pass the text as prompt= (decoder rerankers) or "
            "put any instruction into the query text",
        )
        instruction = _prompt_instruction(self, prompt)
        _refuse("device", device, "choose it when building the engine: Reranker(model, device=...)")
        PeerCompat._require_one_logit(self, "predict")
        single = _is_single_pair(inputs)
        pairs = _pairs([inputs] if single else inputs)
        raw = self.score_pairs(
            pairs,
            normalize=False,
            show_progress=bool(show_progress_bar),
            instruction=instruction,
        )
        activation = activation_fn or PeerCompat._model_activation(self)
        scores = activation(torch.from_numpy(raw).unsqueeze(-1)).squeeze(-1)
        out: np.ndarray | torch.Tensor | list[torch.Tensor]
        if convert_to_tensor:
            out = scores
        elif convert_to_numpy:
            out = scores.float().numpy() if len(scores) else np.array([])
        else:
            out = list(scores)
        return out[0] if single else out

    def rank(
        self: _Engine,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        return_documents: bool = False,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        activation_fn: Callable[..., Any] | None = None,
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
        device: Any = None,
    ) -> list[dict[str, Any]]:
        """``[{"corpus_id": i, "score": s, "text"?: doc}, ...]`` best first, cut to
        ``top_k``, as ``CrossEncoder.rank`` returns it (scores are Python floats on
        :meth:`predict`'s scale; ties keep input order)."""
        check_query(query)
        docs = check_documents(documents)
        check_optional_positive_int(top_k, name="top_k")
        scores = PeerCompat.predict(
            self,
            [(query, doc) for doc in docs],
            batch_size=batch_size,
            show_progress_bar=show_progress_bar,
            activation_fn=activation_fn,
            convert_to_tensor=True,
            prompt_name=prompt_name,
            prompt=prompt,
            device=device,
        )
        assert isinstance(scores, torch.Tensor)
        values = scores.tolist()
        order = np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")[:top_k]
        results = []
        for i in order.tolist():
            result: dict[str, Any] = {"corpus_id": i, "score": values[i]}
            if return_documents:
                result["text"] = docs[i]
            results.append(result)
        return results

    # ------------------------------------------------------------------- FlagEmbedding
    def compute_score(
        self: _Engine,
        sentence_pairs: Any,
        batch_size: int | None = None,
        max_length: int | None = None,
        normalize: bool = False,
        prompt: str | None = None,
    ) -> float | list[float]:
        """``FlagReranker.compute_score``: raw logits (``normalize=True``: their sigmoid),
        a ``float`` for a single ``(query, passage)`` pair, a ``list`` of floats for a list
        of pairs. ``batch_size`` is accepted and has no effect; ``max_length`` must equal the
        engine's (set it when building: ``Reranker(model, max_length=...)``). ``prompt`` is
        ``FlagLLMReranker``'s: a decoder reranker's instruction (module docstring)."""
        if batch_size is not None:
            _check_batch_size(batch_size)
        if max_length is not None and max_length != self.max_length:
            raise ValueError(
                f"max_length={max_length!r} differs from this engine's max_length="
                f"{self.max_length}; build it with Reranker(model, max_length={max_length!r})"
            )
        instruction = _prompt_instruction(self, prompt)
        PeerCompat._require_one_logit(self, "compute_score")
        single = _is_single_pair(sentence_pairs)
        pairs = _pairs([sentence_pairs] if single else sentence_pairs)
        raw = self.score_pairs(pairs, normalize=bool(normalize), instruction=instruction)
        scores: list[float] = raw.tolist()
        return scores[0] if single else scores

    # ------------------------------------------------------------------------ helpers
    def _require_one_logit(self: _Engine, method: str) -> None:
        if self.num_labels != 1:
            raise ValueError(
                f"{method}() follows a one-logit contract, but {self.model_name!r} has "
                f"{self.num_labels} labels; use score_pairs(), which returns the relevant "
                "label's score"
            )

    def _model_activation(self: _Engine) -> Callable[..., Any]:
        """The activation sentence-transformers would apply to this model (found once):
        the one its ``config_sentence_transformers.json`` or ``config.json`` names, else
        sigmoid."""
        cached = getattr(self, "_peer_activation", None)
        if cached is not None:
            return cached
        trust = bool(self.options.trust_remote_code)
        path = _st_config_activation(self) or _hf_config_activation(_config(self))
        activation = (path and _activation_from_path(path, trust)) or torch.nn.Sigmoid()
        self._peer_activation = activation  # type: ignore[attr-defined]
        return activation


def _hub_file(engine: _Engine, filename: str) -> str | None:
    """Local path of ``filename`` next to the model (local directory or Hub cache), or
    ``None`` when the model has no such file."""
    from transformers.utils import cached_file

    opts = engine.options
    try:
        path: str | None = cached_file(
            engine.model_name,
            filename,
            revision=engine.revision,
            cache_dir=opts.cache_dir,
            local_files_only=opts.local_files_only,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except OSError:
        return None
    return path


def _st_config_activation(engine: _Engine) -> str | None:
    """The activation in ``config_sentence_transformers.json``, which sentence-transformers
    reads for a model saved in its own format (one with a ``modules.json``)."""
    if _hub_file(engine, "modules.json") is None:
        return None
    path = _hub_file(engine, ST_CONFIG_FILE)
    if path is None:
        return None
    with open(path, encoding="utf-8") as file:
        value = json.load(file).get("activation_fn")
    return value if isinstance(value, str) else None


def _config(engine: _Engine) -> PretrainedConfig:
    config = getattr(engine.model, "config", None)
    if config is not None:
        return config
    from transformers import AutoConfig

    opts = engine.options
    return AutoConfig.from_pretrained(
        engine.model_name,
        revision=engine.revision,
        cache_dir=opts.cache_dir,
        local_files_only=opts.local_files_only,
        trust_remote_code=opts.trust_remote_code,
    )


def _hf_config_activation(config: PretrainedConfig) -> str | None:
    """``config.json``'s ``sentence_transformers.activation_fn`` (sentence-transformers 4)
    or ``sbert_ce_default_activation_function`` (older)."""
    st = getattr(config, "sentence_transformers", None)
    if isinstance(st, dict) and isinstance(st.get("activation_fn"), str):
        return str(st["activation_fn"])
    legacy = getattr(config, "sbert_ce_default_activation_function", None)
    return legacy if isinstance(legacy, str) else None
