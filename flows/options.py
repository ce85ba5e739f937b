"""Command-line options made from a flow's signature: one place for each parameter's name, default, range and help.

`--min-images-large` is the parameter `min_images_large`, with its default; its help is the flow
docstring's line for it (what the UI shows for the parameter too, parsed alike); its values are
checked by the parameter's annotation (core/parameters.py), the rule Prefect applies when the flow is
called, so the command line and a deployment run refuse the same values.
"""

from __future__ import annotations

import argparse
import inspect
import types
import typing
from collections.abc import Callable, Collection
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError


def add_flow_options(
    parser: argparse.ArgumentParser, flow, *, only: Collection[str] = (), skip: Collection[str] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """An option for each parameter of `flow` (or those in `only`), less `skip`; `defaults` replaces a default."""
    from prefect.utilities.callables import parameter_docstrings

    hints = typing.get_type_hints(flow.fn, include_extras=True)
    described = parameter_docstrings(inspect.getdoc(flow.fn))
    for name, parameter in inspect.signature(flow.fn).parameters.items():
        if (only and name not in only) or name in skip:
            continue
        default = (defaults or {}).get(name, parameter.default)
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, default=default, help=" ".join(described[name].split()).rstrip("."),
            **_values(hints[name]),
        )


def option_type(annotation: Any) -> Callable[[str], Any]:
    """An argparse type that reads an option's text as `annotation` (e.g. core.parameters.Positive) and applies its
    range; a value out of it is a usage error: "0 is not a positive integer" (the annotation's description)."""
    adapter = TypeAdapter(annotation)
    kind = next((getattr(part, "description", None) for part in typing.get_args(annotation)[1:]
                 if getattr(part, "description", None)), None)

    def parse(text: str) -> Any:
        try:
            return adapter.validate_python(text)
        except ValidationError as error:
            said = f"is not {kind}" if kind else f"is refused: {error.errors()[0]['msg'].lower()}"
            raise argparse.ArgumentTypeError(f"{text} {said}") from None

    return parse


def _values(annotation: Any) -> dict[str, Any]:
    """What argparse needs to read a value of `annotation`: its choices, or a type that checks its range."""
    annotation = _given(annotation)
    if typing.get_origin(annotation) is Literal:
        return {"choices": typing.get_args(annotation)}
    if annotation is str:
        return {}
    return {"type": option_type(annotation)}


def _given(annotation: Any) -> Any:
    """`X | None` as X: on the command line a value is always given (its absence is the default)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [kind for kind in typing.get_args(annotation) if kind is not type(None)]
        if len(kinds) == 1:
            return kinds[0]
    return annotation

