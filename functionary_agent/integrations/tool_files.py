"""Tools from a Python file or module named on the command line, and the classes defined there that batch items
name as their `output_type`."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import importlib
import importlib.util
import inspect
import sys
import typing
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import pydantic
import typing_extensions

from functionary_agent.errors import ConfigurationError, ToolDefinitionError
from functionary_agent.tools import Tool

_SOURCE_DIGEST = "__functionary_source_sha1__"
ANSWER_TYPE_KINDS = "pydantic model, dataclass, TypedDict, NamedTuple or Enum"  # the classes items may answer in


def load_tools(spec: str, *, types_file_ok: bool = False) -> list[Tool]:
    """The tools of a file or module: those marked `@tool` if any are, else its public functions.

    Only functions defined in the module itself count, so `from x import helper` does not leak tools. With
    `types_file_ok`, a file or module that defines no functions but defines classes to answer in
    (`answer_type_names`) gives no tools instead of an error: a batch's file of output types.
    """
    module = _import(spec)
    marked = [value for value in vars(module).values() if isinstance(value, Tool)]
    if marked:
        return marked
    functions = [
        value
        for name, value in vars(module).items()
        if inspect.isfunction(value) and not name.startswith("_") and value.__module__ == module.__name__
    ]
    if not functions:
        if types_file_ok and _answer_types(module):
            return []
        raise ToolDefinitionError(f"{spec} defines no public functions and no @tool functions")
    return [Tool.from_function(fn) for fn in functions]


def answer_type_names(spec: str) -> list[str]:
    """The public classes to answer in (a pydantic model, a dataclass, ...) that a tools file or module defines."""
    return _answer_types(_import(spec))


def _answer_types(module: ModuleType) -> list[str]:
    return [name for name, value in vars(module).items()
            if not name.startswith("_") and _not_an_answer_type(value, module.__name__) is None]


def find_answer_type(specs: Iterable[str], name: str) -> type:
    """The class `name` that one of the tools files or modules `specs` defines (not imports), to answer in: a
    pydantic model, a dataclass, a TypedDict, a NamedTuple or an Enum. `LookupError` when none binds `name`;
    `ConfigurationError`, saying what it is, when the first that binds it binds anything else (a function such as
    an imported `subprocess.getoutput`, which pydantic would call with the model's answer, a class imported from
    elsewhere, a lambda, a value)."""
    refusal: str | None = None
    for spec in specs:
        module = _import(spec)
        if name not in vars(module):
            continue
        value = vars(module)[name]
        problem = _not_an_answer_type(value, module.__name__)
        if problem is None:
            return typing.cast(type, value)
        refusal = refusal or f"{name!r} in {spec} is {problem}"
    if refusal is None:
        raise LookupError(name)
    raise ConfigurationError(
        f"output_type {refusal}; it must name a {ANSWER_TYPE_KINDS} defined in the tools, or be str, int, float "
        "or bool"
    )


def _not_an_answer_type(value: object, module_name: str) -> str | None:
    """Why `value`, bound in the module `module_name`, is no type to answer in; None when it is one."""
    if not isinstance(value, type):
        if callable(value):
            kind = "a function" if inspect.isroutine(value) else f"a callable {type(value).__name__}"
            origin = getattr(value, "__module__", None)
            where = "defined there" if origin == module_name else f"from {origin or 'elsewhere'}"
            return f"{kind} ({where}), not a class"
        what = "a module" if inspect.ismodule(value) else f"an instance of {type(value).__name__}"
        return f"{what}, not a class"
    if value.__module__ != module_name:
        return f"a class imported from {value.__module__}, not one defined there"
    if not _is_answer_kind(value):
        return f"a class that is no {ANSWER_TYPE_KINDS}"
    return None


def _is_answer_kind(cls: type) -> bool:
    if issubclass(cls, (pydantic.BaseModel, enum.Enum)) or dataclasses.is_dataclass(cls):
        return True
    is_named_tuple = issubclass(cls, tuple) and hasattr(cls, "_fields")
    return is_named_tuple or typing_extensions.is_typeddict(cls)  # typing's TypedDict and its backport


def _import(spec: str) -> ModuleType:
    path = Path(spec)
    if spec.endswith(".py") or path.exists():
        if not path.is_file():
            raise ConfigurationError(f"tools file not found: {spec}")
        return _import_file(path)
    try:
        return importlib.import_module(spec)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import tools module {spec!r}: {exc}") from None


def _import_file(path: Path) -> ModuleType:
    """The file imported as a module of its own; the same file, unchanged, is imported once per process."""
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
    name = f"_functionary_tools_{resolved.stem}_{digest}"
    source_digest = hashlib.sha1(resolved.read_bytes()).hexdigest()
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, _SOURCE_DIGEST, None) == source_digest:
        return loaded
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise ConfigurationError(f"cannot load {path} as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pydantic look their module up here
    if str(resolved.parent) not in sys.path:  # it may import modules beside it, as a script run with python may;
        sys.path.append(str(resolved.parent))  # last, so it never shadows an installed module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ConfigurationError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
    setattr(module, _SOURCE_DIGEST, source_digest)
    return module
