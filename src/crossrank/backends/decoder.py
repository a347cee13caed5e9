"""Decoder (LLM) rerankers: declarative model families, the prompt tokenizer, the reference runner.

Why: a large share of today's rerankers are decoder LLMs that score a (query, document) pair
from the logits of one or two *answer tokens* after a prompt (Qwen3-Reranker: "yes"/"no"
after a chat template; BAAI's bge-reranker-v2-gemma: "Yes" after an A/B prompt), or from the
one-logit head of a "seq-cls" conversion of such a model (last-token pooling). Everything that
differs between these models is data, so a family is a :class:`DecoderFamily` of a few
declarative lines: the prompt pieces, the answer tokens, the defaults. Adding a family is a new
entry in :data:`FAMILIES` and a test.

What the engine gets, with the same interface as :class:`~crossrank.tokenization.PairTokenizer`:

- :class:`PromptTokenizer` turns pairs into the family's prompt token ids
  (:class:`~crossrank.tokenization.EncodedPairs`). Truncation cuts only the end of the
  document, never the template, the instruction or the (capped) query.
- :class:`DecoderPaddedRunner` is the reference :class:`~crossrank.backends.base.Runner`: a
  right-padded batch through the Hugging Face decoder, the final hidden state of each pair's
  last token, and the LM head *only for the answer-token rows* (a ``[k, hidden]`` matrix, not
  the 151k-row vocabulary projection of every position).

Runner output (what the engine reads): float32 ``[pairs, num_labels]`` where ``num_labels ==
len(family.answer_tokens)`` for causal LMs (the answer-token logits, in the family's order)
and ``1`` for seq-cls conversions. The engine's existing rule then gives the recipes' scores:
two labels ``(no, yes)`` -> raw ``yes - no`` and normalized ``sigmoid(yes - no) =
softmax([no, yes])[yes]`` (Qwen3-Reranker); one label -> raw logit, normalized ``sigmoid``
(FlagEmbedding's ``normalize=True``).

Measurement: exactness is tested against independent implementations of each model card's
recipe in ``tests/backends/test_decoder.py`` (fp32 CPU, scores within 1e-4).
"""

from __future__ import annotations

import logging
import string
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from crossrank.backends.base import Pending, Runner, device_result
from crossrank.errors import ModelLoadError, OptionError
from crossrank.tokenization import (
    EncodedPairs,
    PairTokenizer,
    no_windows,
    split_call,
    window_layout,
    windows_cover,
)
from crossrank.validation import check_instruction, scrub_surrogates

logger = logging.getLogger(__name__)

_FIELDS = frozenset({"instruction", "query", "document"})


@dataclass(frozen=True)
class DecoderFamily:
    """How one family of decoder rerankers turns a pair into tokens and a score.

    - ``segments``: the prompt, as pieces that are tokenized *separately* and concatenated
      (as the recipes do); each may use the fields ``{instruction}``, ``{query}`` and
      ``{document}``. Exactly one piece holds ``{document}``, at its very end, so cutting that
      piece's tail cuts only the document.
    - ``bos``: prepend the tokenizer's BOS token when it has one distinct from its pad token.
    - ``answer_tokens``: the tokens whose last-position logits the runner returns, in order
      (see the module docstring for how the engine turns them into scores).
    - ``architectures`` / ``seq_cls_architectures``: ``config.architectures`` values detected
      as this family, scored through answer-token logits / through a one-logit head.
    - ``required_tokens``: tokens the tokenizer must hold as single tokens (checked at load).
    """

    name: str
    architectures: frozenset[str]
    seq_cls_architectures: frozenset[str]
    segments: tuple[str, ...]
    answer_tokens: tuple[str, ...]
    default_max_length: int
    default_instruction: str
    bos: bool = False
    required_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        fields = [_fields(s) for s in self.segments]
        unknown = set().union(*fields) - _FIELDS
        holders = [i for i, f in enumerate(fields) if "document" in f]
        once = len(holders) == 1 and _names(self.segments[holders[0]]).count("document") == 1
        if unknown or not once or not self.segments[holders[0]].endswith("{document}"):
            raise ValueError(
                f"family {self.name!r}: one segment must end with {{document}} and fields must "
                f"be among {sorted(_FIELDS)} (unknown: {sorted(unknown)})"
            )
        if not 1 <= len(self.answer_tokens) <= 2:
            raise ValueError(
                f"family {self.name!r}: one or two answer tokens, not {self.answer_tokens}"
            )

    @property
    def document_segment(self) -> int:
        return next(i for i, s in enumerate(self.segments) if "document" in _fields(s))

    @property
    def num_labels(self) -> int:
        """Logits per pair a causal-LM runner returns for this family."""
        return len(self.answer_tokens)


def _fields(segment: str) -> set[str]:
    return set(_names(segment))


def _names(segment: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(segment) if name]


# Qwen3-Reranker (0.6B / 4B / 8B), from the model card's transformers recipe
# (huggingface.co/Qwen/Qwen3-Reranker-0.6B, "Transformers Usage"): ``prefix`` and ``suffix``
# are tokenized on their own, the content ``format_instruction(instruction, query, doc)`` in
# one piece truncated to ``max_length - len(prefix) - len(suffix)`` tokens; the score is
# ``softmax([logit("no"), logit("yes")])[1]`` at the last position; max_length=8192; the
# default instruction is the card's.
QWEN3_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3 = DecoderFamily(
    name="qwen3-reranker",
    architectures=frozenset({"Qwen3ForCausalLM"}),
    seq_cls_architectures=frozenset({"Qwen3ForSequenceClassification"}),
    segments=(
        QWEN3_PREFIX,
        "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}",
        QWEN3_SUFFIX,
    ),
    answer_tokens=("no", "yes"),
    default_max_length=8192,
    default_instruction="Given a web search query, retrieve relevant passages that answer the query",
    required_tokens=("<|im_start|>", "<|im_end|>", "<think>", "</think>"),
)

# BAAI/bge-reranker-v2-gemma, from FlagEmbedding's ``FlagLLMReranker``
# (FlagEmbedding/inference/reranker/decoder_only/base.py and abc/inference/AbsReranker.py):
# the query is prefixed "A: " and the passage "B: " (``query_instruction_for_rerank`` /
# ``passage_instruction_for_rerank``), each tokenized without special tokens; the input is
# ``[bos] + query + sep + passage + sep + prompt`` with ``sep = "\n"`` and the default prompt
# below; BOS only when the tokenizer's BOS differs from its pad token; the score is the
# last-position logit of the first token of "Yes" (sigmoid when normalized).
# FlagEmbedding's ``max_length`` (512) bounds query + passage and adds the separators and
# prompt on top; crossrank's ``max_length`` counts every token of the prompt.
BGE_GEMMA = DecoderFamily(
    name="bge-reranker-gemma",
    architectures=frozenset({"GemmaForCausalLM"}),
    seq_cls_architectures=frozenset(),
    segments=("A: {query}", "\n", "B: {document}", "\n", "{instruction}"),
    answer_tokens=("Yes",),
    default_max_length=512,
    default_instruction=(
        "Given a query A and a passage B, determine whether the passage contains an answer to "
        "the query by providing a prediction of either 'Yes' or 'No'."
    ),
    bos=True,
)

#: Every known family, by name (the name is what an override option takes).
FAMILIES: dict[str, DecoderFamily] = {f.name: f for f in (QWEN3, BGE_GEMMA)}


def family_by_name(name: str) -> DecoderFamily:
    """The family called ``name``, or an :class:`OptionError` listing the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise OptionError(
            "family", f"unknown decoder family {name!r}; known: {', '.join(sorted(FAMILIES))}"
        ) from None


def detect_family(
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    name: str | None = None,
) -> DecoderFamily | None:
    """The decoder family of a checkpoint: ``name`` if given, else the family whose
    architectures list one of ``config.architectures``; ``None`` for anything else (an
    encoder cross-encoder). With a ``tokenizer``, a :class:`ModelLoadError` is raised when it
    lacks a token the family needs (answer tokens, template tokens)."""
    family = family_by_name(name) if name is not None else None
    if family is None:
        architectures = set(getattr(config, "architectures", None) or ())
        family = next(
            (
                f
                for f in FAMILIES.values()
                if architectures & (f.architectures | f.seq_cls_architectures)
            ),
            None,
        )
    if family is not None and tokenizer is not None:
        answer_token_ids(family, tokenizer)
        missing = [t for t in family.required_tokens if _single_id(tokenizer, t) is None]
        if missing:
            raise ModelLoadError(f"the tokenizer lacks the {family.name} template tokens {missing}")
    return family


def is_seq_cls(config: PretrainedConfig, family: DecoderFamily) -> bool:
    """True for a seq-cls conversion (one-logit head on the last token) of ``family``."""
    return bool(set(getattr(config, "architectures", None) or ()) & family.seq_cls_architectures)


def _single_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    ids = tokenizer.encode(token, add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 else None


def answer_token_ids(family: DecoderFamily, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Vocabulary ids of the family's answer tokens, each of which must be one token."""
    ids = [_single_id(tokenizer, t) for t in family.answer_tokens]
    missing = [t for t, i in zip(family.answer_tokens, ids, strict=True) if i is None]
    if missing:
        raise ModelLoadError(
            f"the tokenizer does not encode the {family.name} answer tokens {missing} as "
            "single tokens"
        )
    return [int(i) for i in ids if i is not None]


class PromptTokenizer(PairTokenizer):
    """Encodes (query, document) pairs as a decoder family's prompt.

    Same interface as :class:`PairTokenizer` (``encode``, ``encode_windows``,
    ``cap_queries``, ``cap_documents``, ``token_counts``, ``check_instruction``,
    ``template_tokens``, ``pad_id``, ``max_length``, ``query_max_length``), so the engine can
    use either; it reuses the parent's public machinery (shared Rust backend, documents cut
    before tokenizing, crossrank's thread pool, cancel events) and overrides only the public
    encode methods and the two instruction methods. ``max_length``
    counts every token of the prompt. Queries are capped at ``query_max_length`` tokens (as
    text, like the encoder path); the document segment is then cut at its end so the prompt
    fits. ``special_tokens_in_pair`` is the template's token count with an empty query and
    document (the instruction included), i.e. what the engine must reserve besides the
    query and the document; a pair's length is that plus its query and document counts,
    give or take a token where the byte-level BPE merges across a boundary (e.g. a query's
    final "?" with the template's newline). A call's own instruction (``instruction=`` of
    :meth:`encode`, checked by :meth:`check_instruction`) replaces the tokenizer's for that
    call; :meth:`template_tokens` counts its template.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        family: DecoderFamily,
        *,
        max_length: int,
        query_max_length: int,
        instruction: str | None = None,
    ) -> None:
        super().__init__(tokenizer, max_length=max_length, query_max_length=query_max_length)
        self.family = family
        self.instruction = family.default_instruction if instruction is None else instruction
        self.returns_type_ids = False
        bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
        self._bos = [int(bos)] if family.bos and bos is not None and bos != pad else []
        self.answer_ids = answer_token_ids(family, tokenizer)
        # a call's instruction is counted once (server clients reuse a few instructions)
        self._template_counts = lru_cache(maxsize=256)(self._count_template)
        # (instruction, query) -> _Frame; query_max_length is set before the first encode
        self._frames_made: dict[tuple[str, str], _Frame] = {}
        self.special_tokens_in_pair = self._count_template(self.instruction)
        if query_max_length + self.special_tokens_in_pair >= max_length:
            raise ValueError(
                f"query_max_length={query_max_length} leaves no room for the document within "
                f"max_length={max_length} (the {family.name} template takes "
                f"{self.special_tokens_in_pair} tokens)"
            )

    def check_instruction(self, instruction: Any) -> str | None:
        """A call's ``instruction``: ``None`` for the tokenizer's own (also when it is given
        again), else the ``str``, once checked to leave a query of ``query_max_length`` tokens
        room for at least one document token (the check the constructor makes for its own);
        an :class:`~crossrank.errors.OptionError` naming ``instruction`` otherwise."""
        instruction = check_instruction(instruction, decoder=True)
        if instruction is None or instruction == self.instruction:
            return None
        fixed = self.template_tokens(instruction)
        if fixed + self.query_max_length >= self.max_length:
            raise OptionError(
                "instruction",
                f"instruction makes the {self.family.name} prompt {fixed} tokens long without "
                f"its query and document, which leaves a query of up to query_max_length="
                f"{self.query_max_length} tokens no room for the document within max_length="
                f"{self.max_length}; shorten the instruction",
            )
        return instruction

    def template_tokens(self, instruction: str | None = None) -> int:
        """Tokens of the prompt with an empty query and document and ``instruction``
        (``None``: the tokenizer's, ``special_tokens_in_pair``)."""
        if instruction is None or instruction == self.instruction:
            return self.special_tokens_in_pair
        return int(self._template_counts(instruction))

    def _count_template(self, instruction: str) -> int:
        """:meth:`template_tokens`, counted: the pieces tokenized as :meth:`encode` does, uncut."""
        texts = [
            s.format(instruction=instruction, query="", document="") for s in self.family.segments
        ]
        return len(self._bos) + sum(map(len, self._encode_texts(texts, None, offsets=False)))

    def encode(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        *,
        cancel: threading.Event | None = None,
        instruction: str | None = None,
    ) -> EncodedPairs:
        """Prompt ids of pair ``i`` = ``(queries[i], documents[i])``; ``instruction``
        overrides the tokenizer's for this call; ``cancel`` as :meth:`PairTokenizer.encode`."""
        queries = scrub_surrogates(queries)
        documents = list(documents)  # surrogates are scrubbed after the cut
        if not documents:
            return EncodedPairs.concat([])
        frames = self._frames(queries, self.instruction if instruction is None else instruction)

        def chunk(lo: int, hi: int) -> EncodedPairs:
            return self._rows(frames[lo:hi], documents[lo:hi])

        return EncodedPairs.concat(split_call(chunk, len(documents), cancel))

    def encode_windows(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        *,
        window_tokens: int | None,
        overlap: int | None,
        max_windows: int | None = None,
        cancel: threading.Event | None = None,
        instruction: str | None = None,
    ) -> EncodedPairs:
        """One row per document window (``pair_index``/``spans`` set), as
        :meth:`PairTokenizer.encode_windows`: a window holds up to ``window_tokens`` document
        tokens (``None``: all the room the pair's prompt leaves) and starts ``overlap`` tokens
        (``None``: an eighth of the window) before the previous one ends; only the first
        ``max_windows`` are kept. Windows are cut on the document's own tokens and
        re-rendered into the template as text, so each row is a complete prompt; a document
        that fits gives exactly the row :meth:`encode` gives."""
        queries = scrub_surrogates(queries)
        documents = list(documents)
        if not documents:
            return no_windows()
        frames = self._frames(queries, self.instruction if instruction is None else instruction)
        fixed = self._rows(frames, [""] * len(frames)).lengths.tolist()
        layouts = [window_layout(self.max_length - f, window_tokens, overlap) for f in fixed]
        need = None
        if max_windows is not None:
            need = max(windows_cover(room, stride, max_windows) for room, stride in layouts)

        def chunk(lo: int, hi: int) -> EncodedPairs:
            docs = scrub_surrogates(documents[lo:hi])
            encodings = self._encode_texts(documents[lo:hi], need, offsets=True)
            window_frames, window_texts, pair_index, spans = [], [], [], []
            for i, encoding in zip(range(lo, hi), encodings, strict=True):
                offsets, (room, stride) = encoding.offsets, layouts[i]
                for start, end in _windows(len(offsets), room, stride)[:max_windows]:
                    span = (offsets[start][0], offsets[end - 1][1]) if end else (0, 0)
                    whole = start == 0 and end == len(offsets)
                    window_frames.append(frames[i])
                    window_texts.append(docs[i - lo] if whole else docs[i - lo][span[0] : span[1]])
                    pair_index.append(i)
                    spans.append(span)
            return replace(
                self._rows(window_frames, window_texts),
                pair_index=np.asarray(pair_index, dtype=np.int64),
                spans=np.asarray(spans, dtype=np.int64).reshape(-1, 2),
            )

        return EncodedPairs.concat(split_call(chunk, len(documents), cancel))

    def _frames(self, queries: list[str], instruction: str) -> list[_Frame]:
        """Each pair's :class:`_Frame`, made once per distinct (instruction, query) (one
        tokenizer call for the query caps, one for the template pieces, of all those not
        made yet) and kept for later calls, up to ``_MAX_FRAMES``: a request's chunks share
        their query, and made per chunk the two calls cost about as much as all the other
        Python work of a 12-pair chunk."""
        made, distinct = self._frames_made, dict.fromkeys(queries)
        found = {q: f for q in distinct if (f := made.get((instruction, q))) is not None}
        missing = [q for q in distinct if q not in found]
        if missing:
            texts = [
                [
                    s.format(instruction=instruction, query=q, document="")
                    for s in self.family.segments
                ]
                for q in self._capped(missing)[0]
            ]
            ids = self._fixed_ids({t for row in texts for t in row})
            at = self.family.document_segment
            if len(made) + len(missing) > _MAX_FRAMES:
                made.clear()
            for query, row in zip(missing, texts, strict=True):
                before = self._bos + [i for t in row[:at] for i in ids[t]]
                after = [i for t in row[at + 1 :] for i in ids[t]]
                found[query] = made[(instruction, query)] = _Frame(before, row[at], after)
        return [found[q] for q in queries]

    def _fixed_ids(self, texts: set[str]) -> dict[str, list[int]]:
        """Token ids of the template pieces ``texts``, each tokenized whole."""
        ordered = list(texts)
        encodings = self._encode_texts(ordered, None, offsets=False)
        return {t: e.ids for t, e in zip(ordered, encodings, strict=True)}

    def _rows(self, frames: list[_Frame], documents: list[str]) -> EncodedPairs:
        """Each pair's prompt ids: its frame around its document piece, which is cut at its
        end to the room the frame leaves."""
        rooms = [self.max_length - len(f.before) - len(f.after) for f in frames]
        if min(rooms) < 1:
            bad = int(np.argmin(rooms))
            raise ValueError(f"pair {bad}: the prompt without its document exceeds max_length")
        texts = [f.lead + d for f, d in zip(frames, documents, strict=True)]
        # exact in the first max(rooms) tokens (the document text is cut before tokenizing)
        encodings = self._encode_texts(texts, max(rooms), offsets=False)  # scrubs the cut
        return self._flat(
            [
                f.before + e.ids[:room] + f.after
                for f, e, room in zip(frames, encodings, rooms, strict=True)
            ],
            None,
        )


@dataclass(frozen=True)
class _Frame:
    """A prompt around its document: the ids of the pieces before and after the document
    piece, and that piece's text before the document (the piece ends with ``{document}``)."""

    before: list[int]
    lead: str
    after: list[int]


#: Frames a :class:`PromptTokenizer` keeps (it starts over when full).
_MAX_FRAMES = 256


def _windows(tokens: int, room: int, stride: int) -> list[tuple[int, int]]:
    """Token ranges ``[start, end)`` of the windows of a ``tokens``-token document: ``room``
    tokens each, each starting ``stride`` tokens before the previous one ends."""
    if tokens <= room:
        return [(0, tokens)]
    step = room - stride
    return [(s, min(s + room, tokens)) for s in range(0, tokens - stride, step)]


def decoder_head(
    model: PreTrainedModel, family: DecoderFamily, answer_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [k, hidden], bias or None)`` applied to each pair's last hidden state: the
    LM head's answer-token rows of a causal LM, or a seq-cls conversion's score head."""
    if is_seq_cls(model.config, family):
        head = getattr(model, "score", None)
    else:
        head = model.get_output_embeddings()
        if getattr(model.config, "final_logit_softcapping", None):
            raise ModelLoadError("final-logit soft-capping (Gemma 2) is not supported")
    if not isinstance(head, torch.nn.Linear):
        raise ModelLoadError(f"{type(model).__name__} has no linear output head")
    rows = torch.as_tensor(list(answer_ids), device=head.weight.device)
    if is_seq_cls(model.config, family):
        return head.weight.detach(), None if head.bias is None else head.bias.detach()
    weight = head.weight.detach().index_select(0, rows)
    bias = None if head.bias is None else head.bias.detach().index_select(0, rows)
    return weight, bias


def decoder_body(model: PreTrainedModel) -> Any:
    """The decoder stack (embeddings, layers, final norm) under the LM or score head."""
    return getattr(model, model.base_model_prefix)


class DecoderPaddedRunner(Runner):
    """The reference decoder runner: a right-padded batch through the Hugging Face decoder,
    each pair's last-token hidden state, then only the answer-token head rows.

    Right padding keeps every real token at its own position (0, 1, ...), so no position ids
    are needed; the causal mask and the attention mask keep pad tokens out of real ones.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        device: torch.device,
        pad_id: int,
        family: DecoderFamily,
        answer_ids: Sequence[int],
    ) -> None:
        self.body = decoder_body(model)
        self.device = device
        self.pad_id = pad_id
        self.head_weight, self.head_bias = decoder_head(model, family, answer_ids)

    def submit(self, encoded: EncodedPairs) -> Pending:
        rows = np.arange(len(encoded))
        tensors = encoded.padded(rows, self.pad_id)
        with torch.inference_mode():
            ids = torch.from_numpy(tensors["input_ids"]).to(self.device)
            mask = torch.from_numpy(tensors["attention_mask"]).to(self.device)
            hidden = self.body(input_ids=ids, attention_mask=mask).last_hidden_state
            last = torch.from_numpy(encoded.lengths - 1).to(self.device)
            pooled = hidden[torch.arange(len(encoded), device=self.device), last]
            logits = torch.nn.functional.linear(pooled, self.head_weight, self.head_bias)
            return device_result(logits)
