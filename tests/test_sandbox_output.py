"""Pure parts of the sandbox: the head+tail buffer, the model's view of a result, and refusing fake isolation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox import CellError, ExecutionResult, IsolationUnavailableError
from sandbox.isolation import HostSupport, kernel_env, plan_isolation
from sandbox.output import HeadTail, strip_ansi, truncate


@given(
    head=st.integers(0, 40),
    tail=st.integers(0, 40),
    writes=st.lists(st.text(alphabet="ab\nc", max_size=120), max_size=40),
)
def test_head_tail_keeps_exactly_first_and_last_characters(head: int, tail: int, writes: list[str]) -> None:
    buffer = HeadTail(head, tail)
    live = "".join(buffer.write(text) for text in writes)
    full = "".join(writes)
    rest = full[head:]
    expected_tail = rest[max(0, len(rest) - tail) :] if tail else ""
    assert live == buffer.head_text() == full[:head]
    assert buffer.tail_text() == expected_tail
    assert buffer.omitted == len(full) - len(full[:head]) - len(expected_tail)
    if buffer.omitted:
        assert buffer.getvalue() == f"{full[:head]}\n… {buffer.omitted} characters omitted …\n{expected_tail}"
    else:
        assert buffer.getvalue() == full


def test_head_tail_absorbs_a_huge_write_without_copying_it() -> None:
    buffer = HeadTail(5, 5)
    buffer.write("0123456789" * 10_000_000)  # 100 MB: a copy would show up as a slow test, not just memory
    assert buffer.getvalue() == "01234\n… 99999990 characters omitted …\n56789"


def test_truncate_and_strip_ansi() -> None:
    assert truncate("short", 10) == "short"
    assert truncate("abcdefghij" * 3, 10) == "abcde\n… 20 characters omitted …\nfghij"
    assert strip_ansi("\x1b[0;31mZeroDivisionError\x1b[0m: x\x1b]0;title\x07") == "ZeroDivisionError: x"


def test_model_text_shows_paths_as_the_code_sees_them() -> None:
    workdir = Path("/tmp/box-123")
    result = ExecutionResult(
        stdout="hello\n",
        error=CellError("ValueError", "bad", "Traceback…\nValueError: bad"),
        images=[workdir / "image-1.png"],
        files=[workdir / "out" / "table.csv"],
        timed_out=True,
        notes=["timed out after 5 s"],
        workdir=workdir,
        visible_workdir="/mnt/data",
    )
    assert result.to_model_text() == (
        "hello\nTraceback…\nValueError: bad\n[image saved: /mnt/data/image-1.png]\n"
        "[files written: /mnt/data/out/table.csv]\n[timed out after 5 s]"
    )
    assert ExecutionResult().to_model_text() == "[no output]"


def test_a_machine_that_cannot_contain_the_kernel_refuses_unless_the_caller_opts_out() -> None:
    nothing = HostSupport(
        mode=None, reason="unshare: Operation not permitted", can_drop_capabilities=False, pids_cgroup_root=None,
        is_root=False,
    )
    with pytest.raises(IsolationUnavailableError, match="isolation='none'") as refused:
        plan_isolation(network=True, isolation="auto", support=nothing)
    assert "unshare: Operation not permitted" in str(refused.value)
    with pytest.raises(IsolationUnavailableError, match="network=True"):
        plan_isolation(network=False, isolation="none", support=nothing)
    plan = plan_isolation(network=True, isolation="none", support=nothing)
    assert plan.mode == "none" and not plan.contained and plan.data_path is None
    assert not plan.network_blocked and plan.process_limit == "RLIMIT_NPROC" and plan.uid == os.getuid()
    with pytest.raises(ValueError, match="isolation must be"):
        plan_isolation(network=True, isolation="off", support=nothing)


def test_root_gives_every_sandbox_its_own_unprivileged_uid() -> None:
    root = HostSupport(mode="root", reason="", can_drop_capabilities=True, pids_cgroup_root=None, is_root=True)
    plans = [plan_isolation(network=False, isolation="auto", support=root) for _ in range(20)]
    assert len({plan.uid for plan in plans}) == 20 and all(plan.uid >= 0x70000000 for plan in plans)
    assert all(plan.gid == plan.uid and plan.network_blocked and plan.contained for plan in plans)
    assert {plan.process_limit for plan in plans} == {"RLIMIT_NPROC"}


def test_kernel_env_is_an_allowlist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    monkeypatch.setenv("LANG", "C.UTF-8")
    env = kernel_env({"EXTRA": "given"}, str(tmp_path))
    assert "OPENAI_API_KEY" not in env
    assert env["LANG"] == "C.UTF-8" and env["EXTRA"] == "given" and env["HOME"] == str(tmp_path)
