"""The house's rules, read from the source: no import circles, no import running back up a layer, and the public
surface pinned (as httpx's tests/test_exported_members.py does), so a change to either is a deliberate one."""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FRONT_ENDS = ("functionary_agent.cli", "functionary_agent.notebook", "functionary_agent.batch")
LOWER_LAYERS = ("functionary_agent._run", "functionary_agent.models", "functionary_agent.formats")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    _module_name(path): path
    for package in ("functionary_agent", "sandbox")
    for path in sorted((ROOT / package).rglob("*.py"))
}


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST, module: str, runtime_only: bool) -> Iterator[str]:
    """The modules of ours that `module` imports (in functions too); imports under `if TYPE_CHECKING:` only
    when `runtime_only` is false."""
    for node in ast.iter_child_nodes(tree):
        if runtime_only and _type_checking_only(node):
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module)
            for alias in node.names:
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
        yield from _imports(node, module, runtime_only)


def _absolute(node: ast.ImportFrom, module: str) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".")
    is_package = MODULES[module].name == "__init__.py"
    base = package[: len(package) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _graph(runtime_only: bool) -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[module] = {name for name in _imports(tree, module, runtime_only) if name in MODULES} - {module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def test_no_import_circles() -> None:
    assert _cycles(_graph(runtime_only=True)) == []


def test_the_core_never_imports_a_front_end() -> None:
    """Nothing but the package's face and the front ends themselves imports cli, notebook or batch, not even for
    type checking; the server is a front end of its own (the CLI's `serve` starts it)."""
    graph = _graph(runtime_only=False)
    upward = {
        (module, target)
        for module, targets in graph.items()
        if module.startswith("functionary_agent") and module != "functionary_agent"
        and not _under(module, (*FRONT_ENDS, "functionary_agent.server"))
        for target in targets
        if _under(target, (*FRONT_ENDS, "functionary_agent.server"))
    }
    assert upward == set()


def test_lower_layers_never_import_the_conversation_or_the_face() -> None:
    graph = _graph(runtime_only=False)
    upward = {
        (module, target)
        for module, targets in graph.items()
        if _under(module, LOWER_LAYERS)
        for target in targets
        if target in ("functionary_agent", "functionary_agent.conversation")
        or (_under(module, ("functionary_agent.models", "functionary_agent.formats"))
            and _under(target, ("functionary_agent._run",)))
    }
    assert upward == set()


def test_the_sandbox_imports_nothing_of_functionary_agent() -> None:
    graph = _graph(runtime_only=False)
    assert {(m, t) for m, targets in graph.items() if m.startswith("sandbox") for t in targets
            if t.startswith("functionary_agent")} == set()


def test_the_graph_reader_sees_real_imports() -> None:
    """The rules above read what they should: known edges are found, a TYPE_CHECKING-only one only when asked."""
    runtime, everything = _graph(runtime_only=True), _graph(runtime_only=False)
    assert "functionary_agent._run.loop" in runtime["functionary_agent.conversation"]
    assert "functionary_agent.conversation" in everything["functionary_agent._display"]
    assert "functionary_agent.conversation" not in runtime["functionary_agent._display"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


PUBLIC_API = {
    "ApprovalRequired", "AssistantMessage", "ChatModel", "CloseError", "ConfigurationError", "Conversation",
    "ConversationBusyError", "EmbeddedModel", "FunctionaryAgentError", "LimitExceeded", "Limits",
    "MaxTurnsExceeded", "ModelError", "OpenAICompatibleModel", "OutputValidationError", "PendingCall",
    "RunContext", "RunEnd", "Tool", "ToolCall", "ToolDefinitionError", "Usage", "UsageLimitExceeded", "tool",
}


def test_the_public_api_is_pinned() -> None:
    import functionary_agent

    assert set(functionary_agent.__all__) == PUBLIC_API
    for name in functionary_agent.__all__:
        assert getattr(functionary_agent, name) is not None, name


def test_the_package_exports_no_stray_names() -> None:
    """Every public non-module name the package holds is in `__all__` (a private helper leaking out fails)."""
    import types

    import functionary_agent

    names = {name for name, value in vars(functionary_agent).items()
             if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert names - set(functionary_agent.__all__) <= {"annotations", "TYPE_CHECKING", "Any", "functools", "sys"}


@pytest.mark.parametrize("module", [
    "functionary_agent.events", "functionary_agent.errors", "functionary_agent.messages", "functionary_agent.usage",
    "functionary_agent.testing", "functionary_agent.tools", "functionary_agent.run_context",
    "functionary_agent.conversation", "functionary_agent.integrations", "functionary_agent.models",
])
def test_each_public_module_declares_what_it_exports(module: str) -> None:
    loaded = importlib.import_module(module)
    exported = getattr(loaded, "__all__", None)
    assert exported, f"{module} has no __all__"
    assert all(hasattr(loaded, name) for name in exported)
