"""What the commands share: the ``--model`` option and every engine option as a flag.

The engine flags are generated from :func:`crossrank.options.option_fields` (name, help,
default, choices, environment variable) instead of being declared again here, so a new
engine option appears on ``rerank``, ``serve`` and ``score-file`` without touching them, and
the flags cannot drift from the engine. A command decorated with :func:`engine_command`
declares only its own parameters plus ``engine: EngineOptions``; the decorator adds one
typer option per engine option to the command's signature and hands the command the
checked :class:`~crossrank.options.EngineOptions`. A bad value is a usage error (exit 2)
naming its flag, found from :attr:`OptionError.param <crossrank.errors.OptionError>`.

Imports neither torch nor the engine: ``crossrank --help`` stays instant.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Collection
from typing import Annotated, Any

import typer

from crossrank.errors import OptionError
from crossrank.options import EngineOptions, OptionField, option_fields

Model = Annotated[
    str, typer.Option("--model", "-m", help="Hugging Face Hub id or local directory.")
]


def _typer_option(field: OptionField) -> Any:
    """The typer option of one engine option: ``--quantize/--no-quantize`` for a bool."""
    decls = [field.flag]
    if field.annotation is bool:
        decls = [f"{field.flag}/--no-{field.flag[2:]}"]
    return typer.Option(
        *decls,
        help=field.help,
        envvar=field.envvar,
        show_default=not field.secret,
        show_envvar=field.envvar is not None,
    )


def _parameter(field: OptionField) -> inspect.Parameter:
    return inspect.Parameter(
        field.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=field.default,
        annotation=Annotated[field.annotation, _typer_option(field)],
    )


def flag_of(param: str) -> str | None:
    """The command-line flag of an engine option (``None`` for a name that has none)."""
    return next((f.flag for f in option_fields() if param in (f.name, f.key)), None)


def build_engine_options(**values: Any) -> EngineOptions:
    """The checked options, or a usage error naming the flag of the bad one."""
    try:
        return EngineOptions.build(**values)
    except OptionError as err:
        flag = flag_of(err.param)
        raise typer.BadParameter(str(err), param_hint=[flag] if flag else None) from None


def engine_command(
    *, skip: Collection[str] = ()
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command a flag for every engine option but those in ``skip``.

    The command takes ``engine: EngineOptions`` (keyword-only) instead of the flags; it gets
    the options checked, or never runs when one is bad.
    """

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "engine"]
        fields = [f for f in option_fields() if f.name not in skip]

        @functools.wraps(command)
        def run(**kwargs: Any) -> None:
            values = {f.name: kwargs.pop(f.name) for f in fields}
            command(**kwargs, engine=build_engine_options(**values))

        parameters = own + [_parameter(f) for f in fields]
        run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        return run

    return decorate
