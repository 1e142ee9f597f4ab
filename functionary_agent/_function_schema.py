"""A Python function as a tool's schema: its signature and docstring become the JSON schema the model reads.

The schema comes from the signature's type hints and the docstring (through pydantic and docstring-parser), and
the same pydantic model later validates what the model sends back, so the two can never drift apart. A signature
that cannot be described (`*args`, a type with no JSON schema) is a `ToolDefinitionError` naming the parameter.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import docstring_parser
import pydantic
from pydantic.fields import FieldInfo

from functionary_agent._schema import clean_schema
from functionary_agent.errors import ToolDefinitionError
from functionary_agent.run_context import is_run_context


@dataclass(frozen=True)
class Param:
    """One parameter of the function, and where its value comes from."""

    name: str
    field: str  # field name inside the arguments model (params are aliased: `json`, `_x` are legal there)
    positional_only: bool
    run_context: bool = False  # filled from the run, not from the model's arguments


@dataclass(frozen=True)
class FunctionSchema:
    """What a function tells the model (description, JSON schema) and how its arguments are checked: the
    pydantic model and the parameters it fills (both None for a raw JSON schema, checked for required keys only)."""

    description: str
    parameters: dict[str, Any]
    arguments_model: type[pydantic.BaseModel] | None = None
    params: tuple[Param, ...] | None = None


def function_schema(
    fn: Callable[..., Any],
    name: str,
    description: str | None,
    parameter_schema: type[pydantic.BaseModel] | dict[str, Any] | None,
) -> FunctionSchema:
    """The schema of `fn` from its signature and docstring, or from `parameter_schema` (a pydantic model or a
    JSON schema dict); `description` None: the docstring's."""
    doc = docstring_parser.parse(inspect.getdoc(fn) or "")
    if description is None:
        description = "\n\n".join(p for p in (doc.short_description, doc.long_description) if p)
    if isinstance(parameter_schema, dict):
        return FunctionSchema(description, clean_schema(parameter_schema))
    if parameter_schema is not None:
        params = tuple(Param(f, f, False) for f in parameter_schema.model_fields)
        model: type[pydantic.BaseModel] = parameter_schema
    else:
        model, params = _signature_model(fn, name, {p.arg_name: p.description for p in doc.params})
    return FunctionSchema(description, _json_schema(model, fn, name), model, params)


def _signature_model(
    fn: Callable[..., Any], name: str, param_docs: Mapping[str, str | None]
) -> tuple[type[pydantic.BaseModel], tuple[Param, ...]]:
    """One pydantic model for the parameters: the schema the model reads and the validator of what it sends."""
    try:
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(_annotated_target(fn), include_extras=True)
    except (NameError, TypeError, ValueError) as exc:
        raise ToolDefinitionError(f"cannot read the signature of {qualname(fn)}: {exc}") from None
    fields: dict[str, Any] = {}
    params: list[Param] = []
    for index, param in enumerate(signature.parameters.values()):
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            star = "*" if param.kind is param.VAR_POSITIONAL else "**"
            raise ToolDefinitionError(
                f"{qualname(fn)}: parameter {star}{param.name} cannot be described to a model; use named parameters"
            )
        annotation = hints.get(param.name, Any)
        if is_run_context(annotation):
            params.append(_context_param(fn, param))
            continue
        default = ... if param.default is param.empty else param.default
        description = None if _has_explicit_description(annotation) else param_docs.get(param.name)
        field = f"p{index}"
        if description:
            info = pydantic.Field(default, alias=param.name, description=description)
        else:  # description=None would erase the text of an Annotated Field
            info = pydantic.Field(default, alias=param.name)
        fields[field] = (annotation, info)
        params.append(Param(param.name, field, param.kind is param.POSITIONAL_ONLY))
    config = pydantic.ConfigDict(extra="forbid", populate_by_name=False)
    try:
        model = pydantic.create_model(f"{name}_arguments", __config__=config, **fields)
    except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError, TypeError) as exc:
        raise _no_schema_error(fn, {info.alias: annotation for annotation, info in fields.values()}, exc) from None
    return model, tuple(params)


def _context_param(fn: Callable[..., Any], param: inspect.Parameter) -> Param:
    if param.default is not param.empty:
        raise ToolDefinitionError(
            f"{qualname(fn)}: the RunContext parameter {param.name} must have no default; the run always fills it"
        )
    return Param(param.name, "", param.kind is param.POSITIONAL_ONLY, run_context=True)


def _annotated_target(fn: Callable[..., Any]) -> Any:
    """Where the annotations live: a partial's function, a callable object's `__call__`."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.isroutine(fn) or inspect.isclass(fn):
        return fn
    return type(fn).__call__


def _has_explicit_description(annotation: Any) -> bool:
    if typing.get_origin(annotation) is not Annotated:
        return False
    return any(
        isinstance(meta, str) or (isinstance(meta, FieldInfo) and meta.description)
        for meta in typing.get_args(annotation)[1:]
    )


def _json_schema(model: type[pydantic.BaseModel], fn: Callable[..., Any], name: str) -> dict[str, Any]:
    try:
        schema = model.model_json_schema(by_alias=True)
    except (pydantic.PydanticInvalidForJsonSchema, pydantic.PydanticUserError, TypeError) as exc:
        candidates = {field.alias or key: field.annotation for key, field in model.model_fields.items()}
        raise _no_schema_error(fn, candidates, exc) from None
    _apply_string_descriptions(schema, model)
    schema = clean_schema(schema)
    schema.setdefault("properties", {})
    schema.pop("additionalProperties", None)
    return schema


def _apply_string_descriptions(schema: dict[str, Any], model: type[pydantic.BaseModel]) -> None:
    """`Annotated[T, "text"]` is a common way to document a parameter; pydantic ignores bare strings."""
    for field in model.model_fields.values():
        texts = [meta for meta in field.metadata if isinstance(meta, str)]
        prop = schema.get("properties", {}).get(field.alias)
        if texts and isinstance(prop, dict) and not field.description:
            prop["description"] = " ".join(texts)


def _no_schema_error(fn: Callable[..., Any], candidates: Mapping[str, Any], exc: Exception) -> ToolDefinitionError:
    """Name the parameter whose annotation has no JSON schema, trying each on its own."""
    for param, annotation in candidates.items():
        try:
            pydantic.TypeAdapter(annotation).json_schema()
        except Exception as reason:
            first_line = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
            return ToolDefinitionError(
                f"{qualname(fn)}: parameter {param!r} has annotation {annotation!r} with no JSON schema "
                f"({first_line}); use a JSON-compatible type (str, int, float, bool, list, dict, a pydantic model)"
            )
    return ToolDefinitionError(f"{qualname(fn)}: its parameters have no JSON schema: {exc}")


def qualname(fn: object) -> str:
    """A callable's name for messages: its qualified name, else its repr."""
    return getattr(fn, "__qualname__", None) or repr(fn)
