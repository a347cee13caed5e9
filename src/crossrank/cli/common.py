"""What the commands share: the ``--model`` option, and flags generated from a declaration.

The engine flags are generated from :func:`crossrank.options.option_fields` (name, help,
default, choices, environment variable) instead of being declared again here, so a new
engine option appears on ``rerank``, ``serve`` and ``score-file`` without touching them, and
the flags cannot drift from the engine. A command decorated with :func:`engine_command`
declares only its own parameters plus ``engine: EngineOptions``; the decorator adds one
typer option per engine option to the command's signature and hands the command the
checked :class:`~crossrank.options.EngineOptions`. A bad value is a usage error (exit 2)
naming its flag, found from :attr:`OptionError.param <crossrank.errors.OptionError>`.

The same machinery (:class:`FlagGroup`, :func:`flags_command`) generates ``serve``'s server
flags from :class:`~crossrank.server.settings.ServerSettings`: any dataclass declared with
:func:`crossrank.options.option` can become flags.

Imports neither torch nor the engine: ``crossrank --help`` stays instant.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from crossrank.errors import OptionError
from crossrank.options import EngineOptions, OptionField, option_fields

Model = Annotated[
    str, typer.Option("--model", "-m", help="Hugging Face Hub id or local directory.")
]


def _typer_option(field: OptionField) -> Any:
    """The typer option of one field: ``--quantize/--no-quantize`` for a bool; a secret's
    value (or default) is never shown."""
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


@dataclass(frozen=True)
class FlagGroup:
    """Flags generated from one declaration, and the checked object they build.

    ``param`` is the command's keyword-only parameter that receives the object; ``build``
    makes it from the flags' values by field name and raises
    :class:`~crossrank.errors.OptionError` for a bad one.
    """

    param: str
    fields: tuple[OptionField, ...]
    build: Callable[..., Any]

    def flag_of(self, name: str) -> str | None:
        """The flag of a field (by name or config key); ``None`` for a name that has none."""
        return next((f.flag for f in self.fields if name in (f.name, f.key)), None)

    def checked(self, values: dict[str, Any]) -> Any:
        """The built object, or a usage error naming the flag of the bad value."""
        try:
            return self.build(**values)
        except OptionError as err:
            raise self.usage_error(err) from None

    def usage_error(self, err: OptionError) -> typer.BadParameter:
        """A usage error (exit 2) with ``err``'s message, naming the flag of its field."""
        flag = self.flag_of(err.param)
        return typer.BadParameter(str(err), param_hint=[flag] if flag else None)


def flags_command(group: FlagGroup) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command one flag per field of ``group``, in place of its ``group.param``
    parameter, which gets the checked object (the command never runs when a value is bad).
    Decorators stack: each replaces its own parameter."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != group.param]

        @functools.wraps(command)
        def run(**kwargs: Any) -> None:
            values = {f.name: kwargs.pop(f.name) for f in group.fields}
            command(**kwargs, **{group.param: group.checked(values)})

        parameters = own + [_parameter(f) for f in group.fields]
        run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        return run

    return decorate


def engine_command(
    *, skip: Collection[str] = ()
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command a flag for every engine option but those in ``skip``.

    The command takes ``engine: EngineOptions`` (keyword-only) instead of the flags; it gets
    the options checked, or never runs when one is bad.
    """
    fields = tuple(f for f in option_fields() if f.name not in skip)
    return flags_command(FlagGroup("engine", fields, EngineOptions.build))
