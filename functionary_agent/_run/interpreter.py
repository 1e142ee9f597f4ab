"""The code interpreter as the model's `python` tool: one `sandbox.KernelSandbox` per conversation.

The model is sent `{"type": "code_interpreter"}` (so Functionary prompts announce the stateful Jupyter tool the
models were trained on) and calls `python` with `{"code": ...}`; raw code is accepted too, since that is what
the models write and some servers pass it through unwrapped. Before a cell reaches the kernel, the code phase
(`code_cell.clean_cell`) keeps only its Python: fences and prose around the code are left out, with a one-line note
in the result; a cell with no Python in it is not run, and the model reads why.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from functionary_agent._openai_messages import code_of
from functionary_agent._run.code_cell import CodeCell, clean_cell
from functionary_agent.errors import ConfigurationError
from functionary_agent.messages import error_result
from functionary_agent.run_context import RunContext
from functionary_agent.tools import Tool, ToolOutcome

if TYPE_CHECKING:
    from sandbox import KernelSandbox, SandboxPool

CODE_INTERPRETER: dict[str, str] = {"type": "code_interpreter"}
PYTHON = "python"
_DESCRIPTION = "Run Python code in a stateful Jupyter kernel; files go under /mnt/data."
_PARAMETERS = {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}


def is_code_interpreter(item: object) -> bool:
    return isinstance(item, Mapping) and item.get("type") == "code_interpreter"


class PythonTool(Tool):
    """Runs the model's code in a sandbox; the result text (output, traceback, saved images) is what the model
    reads. `owns_sandbox` says whether closing the conversation closes the sandbox. `code_phase` (default on)
    cleans each cell before it runs; off, the cell goes to the kernel as the model wrote it (for measuring the
    phase: benchmarks/code_tasks.py)."""

    def __init__(self, box: KernelSandbox, *, owns_sandbox: bool, code_phase: bool = True) -> None:
        super().__init__(PYTHON, _DESCRIPTION, dict(_PARAMETERS), self.execute)
        self.sandbox = box
        self.owns_sandbox = owns_sandbox
        self.code_phase = code_phase

    @classmethod
    def start(cls, option: bool | KernelSandbox | SandboxPool | Mapping[str, Any]) -> PythonTool:
        """A tool over a sandbox from `code_interpreter=`: True (defaults), a dict of KernelSandbox settings, or a
        KernelSandbox the caller keeps ownership of, or a `sandbox.SandboxPool` to take a warm sandbox from (this
        conversation's own: closing it destroys the sandbox and the pool refills). The kernel starts now, in the
        background."""
        try:
            from sandbox import KernelSandbox, SandboxPool
        except ImportError as exc:
            raise ConfigurationError(
                f"the code interpreter needs jupyter-client and ipykernel: pip install 'functionary-agent[sandbox]' "
                f"({exc})"
            ) from None
        if isinstance(option, SandboxPool):  # waits while every sandbox is out; PoolExhaustedError past its timeout
            box, owned = option.acquire(), True
        elif isinstance(option, KernelSandbox):
            box, owned = option, False
        else:
            try:
                box, owned = KernelSandbox(**(dict(option) if isinstance(option, Mapping) else {})), True
            except (TypeError, ValueError) as exc:  # an unknown setting, a bad limit, gateway_url with local limits
                raise ConfigurationError(f"code_interpreter settings: {exc}") from None
        box.start_background()
        return cls(box, owns_sandbox=owned)

    def to_openai(self) -> dict[str, Any]:
        return dict(CODE_INTERPRETER)

    async def run(
        self, arguments: str | Mapping[str, Any] | None, context: RunContext[Any] | None = None
    ) -> ToolOutcome:
        started = time.perf_counter()
        code = code_of(arguments)
        if not code.strip():
            return ToolOutcome(error_result('python needs code to run: {"code": "print(1 + 1)"}'), is_error=True)
        cell = self.prepare(code)
        if not cell.runs:
            return ToolOutcome(cell.refusal, True, time.perf_counter() - started)
        try:
            result = await self.sandbox.aexecute(cell.code)
        except Exception as exc:  # a sandbox that cannot start or was closed: the model should hear why
            return ToolOutcome(error_result(f"the code interpreter failed: {exc}"), True, time.perf_counter() - started)
        # a timeout or a dead kernel may not recur on a retry; an exception of the code itself will
        transient = result.timed_out or result.kernel_died
        text = _with_note(result.to_model_text(), cell.note)
        return ToolOutcome(text, not result.ok, time.perf_counter() - started, transient)

    def prepare(self, code: str) -> CodeCell:
        """What of `code` runs: the code phase's cleaned cell, or the cell as written when the phase is off."""
        return clean_cell(code) if self.code_phase else CodeCell(code)

    async def aclose(self) -> None:
        if self.owns_sandbox:
            await self.sandbox.aclose()

    def execute(self, code: str) -> str:
        """Run `code` from sync code (calling the tool directly); the loop uses the async `run`."""
        cell = self.prepare(code)
        if not cell.runs:
            return cell.refusal
        return _with_note(self.sandbox.execute(cell.code).to_model_text(), cell.note)


def _with_note(text: str, note: str) -> str:
    """The kernel's output, then the code phase's one-line note (what was left out), when there is one."""
    if not note:
        return text
    return f"{text}\n{note}" if text else note
