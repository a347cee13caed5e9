"""Every engine option, declared once: name, type, default, check and help text.

Before this module an option was declared in the engine, in its option checker, in the
``serve`` flags and their dict, in the Ray Serve schema, in the adapters and in the other
commands, and the copies had drifted apart (``True`` was accepted as a token budget by one,
refused as a length by another). Now :class:`EngineOptions` is the single declaration:

* :class:`crossrank.Reranker` takes ``options=EngineOptions(...)`` and/or keyword overrides;
* command-line flags, the Ray Serve config schema and the adapters' fields are generated
  from :func:`option_fields` (help text, default, choices, flag name) and validated by
  building an :class:`EngineOptions`;
* a bad value raises :class:`~crossrank.errors.OptionError` whose ``param`` names the
  option, so each front door can name its own flag or field without parsing a message.

:func:`option`, :func:`check_fields` and :func:`option_fields` are not tied to the engine:
the server's :class:`~crossrank.server.settings.ServerSettings` is declared with them too,
and ``crossrank serve`` generates its server flags from it the same way.

The module imports neither torch nor transformers: a command line can check its options
before anything heavy is loaded. Checks that need the model or tokenizer (``max_length``
against the model's positions, ``chunk_overlap`` against the room a query leaves) happen at
load and raise the same error type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

from crossrank.errors import OptionError, OptionTypeError

#: The reranker used when no model is named (front doors show it as their default).
DEFAULT_MODEL = "BAAI/bge-reranker-v2-m3"

#: Where the forward pass runs: PyTorch, or ONNX Runtime on CPU (``quantize`` for int8).
Backend = Literal["torch", "onnx"]
#: What happens to a document longer than the room a pair leaves it.
LongDocsMode = Literal["truncate", "chunk"]
#: How the scores of a long document's windows fold into one.
Aggregate = Literal["max", "mean", "first"]

BACKENDS: tuple[str, ...] = get_args(Backend)
LONG_DOCS_MODES: tuple[str, ...] = get_args(LongDocsMode)
AGGREGATES: tuple[str, ...] = get_args(Aggregate)
DTYPES = ("auto", "float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16")

#: Spellings accepted for an option besides its own name (documented front-door names).
ALIASES = {"max_batch_tokens": "batch_tokens"}


# ----------------------------------------------------------------------------- the checks
def is_positive_int(value: object) -> bool:
    """The one positive-int rule: an ``int`` (never a ``bool``) of at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def positive_int(minimum: int = 1, *, optional: bool = False) -> Callable[[str, Any], None]:
    """The check of an int option of at least ``minimum`` (``None`` allowed if ``optional``)."""

    def check(name: str, value: Any) -> None:
        if optional and value is None:
            return
        if not is_positive_int(value) or value < minimum:
            need = "a positive int" if minimum == 1 else f"an int >= {minimum}"
            raise OptionError(
                name, f"{name} must be {need}{' or None' if optional else ''}, got {value!r}"
            )

    return check


def _non_negative_int_or_none(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise OptionError(name, f"{name} must be an int >= 0 or None, got {value!r}")


def _one_of(choices: tuple[str, ...]) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if value not in choices:
            raise OptionError(name, f"{name} must be one of {choices}, got {value!r}")

    return check


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise OptionTypeError(name, f"{name} must be a bool, got {type(value).__name__}")


def _optional_str(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise OptionTypeError(name, f"{name} must be a str or None, got {type(value).__name__}")


def _device(name: str, value: Any) -> None:
    """A device name, a ``torch.device``, or a non-empty list of them (one replica each)."""
    devices = value if isinstance(value, (list, tuple)) else [value]
    if not devices:
        raise OptionError(name, f"{name} must be a device or a non-empty list of devices")
    for item in devices:
        if not isinstance(item, str) and type(item).__name__ != "device":
            raise OptionTypeError(
                name, f"{name} must be a device name such as 'cuda:0', got {item!r}"
            )


def _dtype(name: str, value: Any) -> None:
    if isinstance(value, str):
        if value.lower() not in DTYPES:
            raise OptionError(
                name, f"{name} must be one of {DTYPES} or a torch.dtype, got {value!r}"
            )
    elif type(value).__name__ != "dtype":
        raise OptionTypeError(name, f"{name} must be a str or torch.dtype, got {value!r}")


def _cache(name: str, value: Any) -> None:
    from crossrank.cache import check_cache  # leaf module, no heavy imports

    try:
        check_cache(value)
    except TypeError as err:
        raise OptionTypeError(name, str(err)) from None
    except ValueError as err:
        raise OptionError(name, str(err)) from None


def _fast_path(name: str, value: Any) -> None:
    """``None``, a ``bool``, or a :class:`crossrank.backends.packed.PackedOptions`."""
    if value is not None and not isinstance(value, bool) and not hasattr(value, "cuda_graphs"):
        raise OptionTypeError(
            name, f"{name} must be None, a bool or PackedOptions, got {type(value).__name__}"
        )


def option(
    default: Any,
    help: str,
    check: Callable[[str, Any], None] | None = None,
    *,
    flag: bool = True,
    secret: bool = False,
    envvar: str | None = None,
) -> Any:
    """Declare one option: its default, help text and check.

    ``flag=False`` keeps an option off command lines and config schemas (it takes a Python
    object, e.g. a ``Cache`` instance or ``PackedOptions``, or only makes sense in code);
    ``secret=True`` marks a value that may hold a password (never echoed in errors or logs);
    ``envvar`` names the environment variable a front door reads when the flag is not given.
    A secret is also left out of the generated ``repr``.
    """
    return field(
        default=default,
        repr=not secret,
        metadata={"help": help, "check": check, "flag": flag, "secret": secret, "envvar": envvar},
    )


def check_fields(declared: Any) -> None:
    """Run the check of every field of a dataclass declared with :func:`option`."""
    for spec in dataclasses.fields(declared):
        check = spec.metadata.get("check")
        if check is not None:
            check(spec.name, getattr(declared, spec.name))


# ----------------------------------------------------------------------------- the options
@dataclass(frozen=True)
class EngineOptions:
    """The options of a :class:`crossrank.Reranker` (everything but the model name).

    Frozen and self-validating: building one with a bad value raises
    :class:`~crossrank.errors.OptionError` naming the option. Use :meth:`replace` (or
    ``Reranker(model, options, **overrides)``) to derive a variant.
    """

    device: Any = option(
        "auto",
        "Where to run: 'auto' (CUDA, then Apple MPS, then CPU), 'cpu', 'cuda', 'cuda:1', "
        "'mps', or a list of devices (one replica each; large calls are split across them).",
        _device,
    )
    dtype: Any = option(
        "auto",
        "Weights and compute dtype: 'auto' (fp16 on CUDA/MPS, fp32 on CPU), 'float32', "
        "'float16', 'bfloat16', or a torch.dtype.",
        _dtype,
    )
    max_length: int = option(512, "Most tokens per (query, document) pair.", positive_int(8))
    query_max_length: int | None = option(
        None,
        "Most query tokens; a longer query is cut (default: 3/4 of max_length, as FlagEmbedding).",
        positive_int(optional=True),
    )
    normalize: bool = option(
        True,
        "Return probabilities in [0, 1] (sigmoid of the logit); False returns raw logits.",
        _boolean,
    )
    batch_tokens: int | None = option(
        None,
        "Tokens per forward pass, padding included (default: 8192 on CPU, 65536 on CUDA).",
        positive_int(optional=True),
    )
    long_docs: str = option(
        "truncate",
        "A document longer than the pair allows: keep its first tokens (truncate), or score "
        "every window of it and keep one score (chunk).",
        _one_of(LONG_DOCS_MODES),
    )
    chunk_tokens: int | None = option(
        None,
        "With chunk: document tokens per window (default: all the room after the query).",
        positive_int(optional=True),
    )
    chunk_overlap: int | None = option(
        None,
        "With chunk: tokens shared by neighbouring windows (default: an eighth of the window).",
        _non_negative_int_or_none,
    )
    aggregate: str = option(
        "max",
        "With chunk: a document's score from its windows' scores (max, mean of logits, first).",
        _one_of(AGGREGATES),
    )
    max_windows: int = option(
        64,
        "With chunk: most windows scored per document; a longer document is scored on its "
        "first max_windows windows (and only that much of its text is tokenized).",
        positive_int(),
    )
    family: str | None = option(
        None,
        "Decoder (LLM) reranker family: None detects it from the model's config "
        "(qwen3-reranker, bge-reranker-gemma); a family name overrides the detection.",
        _optional_str,
    )
    instruction: str | None = option(
        None,
        "Decoder rerankers: the task instruction put in the prompt (default: the family's, "
        "e.g. Qwen3-Reranker's web-search one; a scoring call's instruction= replaces it for "
        "that call); refused for encoder cross-encoders.",
        _optional_str,
    )
    cache: Any = option(
        None,
        "Score cache: 'memory' (an in-process LRU), or a redis://, rediss:// or unix:// URL "
        "shared by several processes (entries expire after a day), or a Cache object.",
        _cache,
        secret=True,
        envvar="CROSSRANK_CACHE",
    )
    backend: str = option(
        "torch", "torch, or onnx (ONNX Runtime on CPU, float32 or int8).", _one_of(BACKENDS)
    )
    quantize: bool = option(
        False, "With backend onnx: dynamic int8 weights (about 2x faster on CPU).", _boolean
    )
    onnx_cache_dir: str | None = option(
        None,
        "Where exported ONNX models are kept (default: $CROSSRANK_ONNX_CACHE or "
        "~/.cache/crossrank/onnx).",
        _optional_str,
    )
    fast_path: Any = option(
        None,
        "None picks the packed (padding-free) CUDA runner where it applies; False forces the "
        "padded reference runner; True or PackedOptions forces the packed one.",
        _fast_path,
        flag=False,
    )
    self_check: bool = option(
        True,
        "At load, score a multilingual probe set with the fast runner and the reference runner "
        "on the same weights and fall back to the reference if they disagree.",
        _boolean,
    )
    split_tokens: int = option(
        16384,
        "With several devices: calls of at least this many tokens are split across them.",
        positive_int(),
    )
    overlap_min_pairs: int = option(
        32,
        "With the packed CUDA runner: a call of more than this many pairs is tokenized chunk "
        "by chunk while the GPU scores the chunks already queued (on one H200 a 1x50 call "
        "split 12 + 38 took 14.9-15.0 ms p50 against 15.2-15.4 ms in one pass; smaller calls "
        "gain nothing: benchmarks/gpu_peers.py).",
        positive_int(),
        flag=False,
    )
    overlap_first_chunk: int = option(
        12,
        "With overlap: pairs in the first chunk (tokenized before the GPU has work, so small).",
        positive_int(),
        flag=False,
    )
    overlap_chunk_pairs: int = option(
        256,
        "With overlap: the most pairs in one later chunk (chunks grow 4-fold up to it).",
        positive_int(),
        flag=False,
    )
    revision: str | None = option(
        None, "Model revision on the Hub (branch, tag or commit).", _optional_str
    )
    cache_dir: str | None = option(
        None, "Hugging Face cache directory for downloaded models.", _optional_str
    )
    local_files_only: bool = option(
        False, "Never contact the Hub; use a local directory or the local cache.", _boolean
    )
    trust_remote_code: bool = option(
        False,
        "Run Python code shipped with the model (off by default: only for models you trust).",
        _boolean,
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.quantize and self.backend != "onnx":
            raise OptionError(
                "quantize", "quantize=True needs backend='onnx' (dynamic int8 via ONNX Runtime)"
            )

    @classmethod
    def build(cls, options: EngineOptions | None = None, **overrides: Any) -> EngineOptions:
        """``options`` (default: all defaults) with ``overrides`` applied; alias names such as
        ``max_batch_tokens`` are accepted, an unknown name is an :class:`OptionTypeError`."""
        base = cls() if options is None else options
        if not isinstance(base, EngineOptions):
            raise OptionTypeError(
                "options", f"options must be an EngineOptions, got {type(base).__name__}"
            )
        return base.replace(**overrides) if overrides else base

    def replace(self, **overrides: Any) -> EngineOptions:
        """A copy with ``overrides`` applied (checked like the constructor)."""
        known = {spec.name for spec in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for name, value in overrides.items():
            key = ALIASES.get(name, name)
            if key not in known:
                raise OptionTypeError(name, f"unknown engine option {name!r}")
            changes[key] = value
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """Every option by name (shallow: a ``Cache`` object stays the same object)."""
        return {spec.name: getattr(self, spec.name) for spec in dataclasses.fields(self)}

    def __repr__(self) -> str:
        """Only the options that differ from their defaults; secrets are masked."""
        shown = [
            f"{spec.name}={'***' if spec.metadata['secret'] else repr(value)}"
            for spec, value in ((s, getattr(self, s.name)) for s in dataclasses.fields(self))
            if value != spec.default
        ]
        return f"EngineOptions({', '.join(shown)})"


@dataclass(frozen=True)
class OptionField:
    """What a front door needs to expose one option: a flag, a schema field, a form field."""

    name: str
    default: Any
    help: str
    choices: tuple[str, ...] | None
    secret: bool
    envvar: str | None
    #: The type a front door parses the value as (``int | None``, ``bool``, a ``Literal`` of
    #: the choices; ``str`` or ``str | None`` for options that also take Python objects).
    annotation: Any

    @property
    def key(self) -> str:
        """The name in a config file or schema: the option's own name, or its documented
        alias (``max_batch_tokens`` for the token budget)."""
        return next((a for a, target in ALIASES.items() if target == self.name), self.name)

    @property
    def flag(self) -> str:
        """The command-line spelling: ``--chunk-overlap``; ``--max-batch-tokens`` for the
        token budget (the name our documentation has always used)."""
        return "--" + self.key.replace("_", "-")


_CHOICES: Mapping[str, tuple[str, ...]] = {
    "long_docs": LONG_DOCS_MODES,
    "aggregate": AGGREGATES,
    "backend": BACKENDS,
}


def option_fields(
    declaration: type = EngineOptions, *, flags_only: bool = True
) -> Iterator[OptionField]:
    """The options of ``declaration`` (a dataclass whose fields are declared with
    :func:`option`: the engine's, or the server's settings) in order, for generating front
    doors; ``flags_only`` skips the ones that take Python objects or have no flag."""
    hints = get_type_hints(declaration)
    for spec in dataclasses.fields(declaration):
        if flags_only and not spec.metadata["flag"]:
            continue
        choices = _CHOICES.get(spec.name) if declaration is EngineOptions else None
        annotation = hints[spec.name]
        if choices is not None:
            annotation = Literal[choices]
        elif annotation is Any:  # a device, dtype or cache: its name on a command line
            annotation = str if isinstance(spec.default, str) else str | None
        elif get_origin(annotation) is tuple:  # several values: a repeatable flag
            annotation = list[get_args(annotation)[0]]  # type: ignore[misc]
        yield OptionField(
            spec.name,
            spec.default,
            spec.metadata["help"],
            choices,
            spec.metadata["secret"],
            spec.metadata["envvar"],
            annotation,
        )


def args_docstring(indent: str = "        ") -> str:
    """A Google-style ``Args:`` section listing every option with its default and help, for
    the docstrings of the classes that take them (generated, so it never drifts)."""
    lines = [f"{indent}Args:"]
    for spec in dataclasses.fields(EngineOptions):
        lines.append(f"{indent}    {spec.name} (default {spec.default!r}): {spec.metadata['help']}")
    return "\n".join(lines)
