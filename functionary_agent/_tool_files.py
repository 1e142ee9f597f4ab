"""Tools from a Python file or module named on the command line."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from functionary_agent.errors import ConfigurationError, ToolDefinitionError
from functionary_agent.tools import Tool

_SOURCE_DIGEST = "__functionary_source_sha1__"


def load_tools(spec: str) -> list[Tool]:
    """The tools of a file or module: those marked `@tool` if any are, else its public functions.

    Only functions defined in the module itself count, so `from x import helper` does not leak tools.
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
        raise ToolDefinitionError(f"{spec} defines no public functions and no @tool functions")
    return [Tool.from_function(fn) for fn in functions]


def find_in_tools(specs: Iterable[str], name: str) -> Any:
    """What the first of the tools files or modules `specs` that defines `name` binds it to (a type to answer in,
    say); `LookupError` when none does."""
    for spec in specs:
        module = _import(spec)
        if name in vars(module):
            return vars(module)[name]
    raise LookupError(name)


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
