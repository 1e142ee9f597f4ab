"""Killed processes lose nothing: processes SIGKILLed at random points while they save a large conversation or
write a batch's output, many times, leave the old file or the new one (never a torn one) and a batch that a rerun
finishes with every item exactly once. A plain, non-atomic writer under the same kills is the control: it tears,
so these checks can fail."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from functionary_agent import ConfigurationError, Conversation
from functionary_agent.testing import ScriptedModel
from tests.openai_server import Action, ScriptedServer, reply

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = 2500  # x ~2 KB: a 5 MB save file
KILL_BUDGET_S = 60.0  # for each kill loop, bounded even on a loaded machine


def conversation_contents(which: str) -> list[dict[str, Any]]:
    """One of two distinct large conversations, `which` "A" or "B", the same in every process."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{which}{i} " + which.lower() * 2000}
            for i in range(MESSAGES)]


# -- a process that forks savers to be killed --------------------------------------------------------------------
# One child imports everything and builds both contents once; per "atomic" or "plain" line on its stdin it forks a
# saver that saves once (then says "ready PID") and goes on saving A and B in turn until it is killed. The child
# reaps it and says "reaped PID SIGNAL". Forking keeps each kill to a fraction of a second instead of an import.
SAVER = textwrap.dedent("""
    import json, os, sys, traceback
    from functionary_agent import Conversation
    from functionary_agent.testing import ScriptedModel
    from tests.test_killed_processes import conversation_contents

    path = sys.argv[1]
    contents = [conversation_contents("A"), conversation_contents("B")]
    chats = [Conversation(ScriptedModel([])) for _ in contents]
    for chat, messages in zip(chats, contents):
        chat.messages = messages
    texts = [json.dumps({"format": "functionary-agent/conversation", "version": 1, "messages": m}) for m in contents]

    def save(kind, turn):
        if kind == "atomic":
            chats[turn % 2].save(path)
        else:  # the control: truncate, then write, as a naive save does
            with open(path, "w") as file:
                file.write(texts[turn % 2])

    def save_until_killed(kind, parent):
        save(kind, 0)
        os.write(1, f"ready {os.getpid()}\\n".encode())
        turn = 1
        while os.getppid() == parent:  # never outlives a test that stopped short
            save(kind, turn)
            turn += 1

    for command in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                save_until_killed(command.strip(), os.getppid())
            except BaseException:
                traceback.print_exc()
            os._exit(1)
        _, status = os.waitpid(pid, 0)
        print("reaped", pid, os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1, flush=True)
""")


@contextmanager
def saver_process(path: Path) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        yield process
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout=30)
        finally:
            process.kill()


def kill_a_saver(saver: subprocess.Popen[str], kind: str, path: Path, rng: random.Random, aimed: bool) -> None:
    """Fork a saver of `kind` and SIGKILL it once it has saved once: after a random delay, or `aimed` at a write:
    a random instant within 20 ms of the next change in the folder (a file appears, the file is truncated)."""
    assert saver.stdin is not None and saver.stdout is not None
    saver.stdin.write(kind + "\n")
    saver.stdin.flush()
    ready = saver.stdout.readline().split()
    assert ready[:1] == ["ready"], f"the saver did not start: {ready}"
    if aimed:
        before, deadline = folder_state(path.parent), time.monotonic() + 30
        while folder_state(path.parent) == before and time.monotonic() < deadline:
            time.sleep(0.0005)
    time.sleep(rng.uniform(0, 0.02 if aimed else 0.6))
    os.kill(int(ready[1]), signal.SIGKILL)
    assert saver.stdout.readline().split() == ["reaped", ready[1], str(int(signal.SIGKILL))]


def folder_state(folder: Path) -> list[tuple[str, int, int, int]]:
    """What a writer changes in `folder`: its files' names, inodes, sizes and modification times."""
    state = []
    for entry in os.scandir(folder):
        with contextlib.suppress(FileNotFoundError):  # a temporary file renamed away meanwhile
            status = entry.stat()
            state.append((entry.name, status.st_ino, status.st_size, status.st_mtime_ns))
    return sorted(state)


def saved_content(path: Path, contents: dict[str, list[dict[str, Any]]]) -> str:
    """Which whole content ("A" or "B") the file holds; "torn" when it does not load."""
    try:
        messages = Conversation.load(path, ScriptedModel([])).messages
    except ConfigurationError:
        return "torn"
    found = [name for name, expected in contents.items() if messages == expected]
    assert found, "the file loads but holds neither content"
    return found[0]


def temporaries(path: Path) -> list[str]:
    return sorted(entry.name for entry in path.parent.iterdir() if entry.name != path.name)


def test_a_save_killed_at_random_points_leaves_the_old_or_the_new_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    contents = {name: conversation_contents(name) for name in "AB"}
    rng = random.Random(26)
    seen: list[str] = []
    mid_save = 0  # kills that left a save's temporary file: they landed while it was written, synced or renamed
    started = time.monotonic()
    with saver_process(path) as saver:
        while len(seen) < 40 and time.monotonic() - started < KILL_BUDGET_S:
            kill_a_saver(saver, "atomic", path, rng, aimed=len(seen) % 2 == 1)
            seen.append(saved_content(path, contents))
            left = temporaries(path)
            assert len(left) <= 1, f"temporary files pile up: {left}"  # earlier kills' were removed by this saver
            mid_save += len(left)
            assert all(name.startswith(".chat.json.") and name.endswith(".saving.tmp") for name in left), left
        chat = Conversation(ScriptedModel([]))
        chat.messages = contents["A"]
        chat.save(path)  # the next save removes what a killed one left
    assert temporaries(path) == []
    print(f"\natomic save: {len(seen)} kills, {mid_save} mid-write, {seen.count('A')} A, {seen.count('B')} B, "
          f"{seen.count('torn')} torn")
    assert len(seen) >= 15, "too few kills to show anything"
    assert seen.count("torn") == 0
    assert mid_save >= 5 and seen.count("A") >= 1 and seen.count("B") >= 1  # kills did land mid-save


def test_the_control_a_plain_write_killed_the_same_way_tears(tmp_path: Path) -> None:
    """The same kills against `open(path, "w").write(...)`: the check above catches a torn file."""
    path = tmp_path / "chat.json"
    contents = {name: conversation_contents(name) for name in "AB"}
    rng = random.Random(26)
    seen: list[str] = []
    started = time.monotonic()
    with saver_process(path) as saver:
        while len(seen) < 12 and time.monotonic() - started < KILL_BUDGET_S:
            kill_a_saver(saver, "plain", path, rng, aimed=len(seen) % 2 == 1)
            seen.append(saved_content(path, contents))
    print(f"\nplain write: {len(seen)} kills, {seen.count('torn')} torn")
    assert seen.count("torn") >= 1


def test_a_save_removes_a_dead_saves_temporary_file_but_never_a_live_one(tmp_path: Path) -> None:
    """Another process holds a save's temporary file (locked, as a save in progress does): a save beside it leaves
    it alone, and removes it once that process is SIGKILLed; a file that only looks alike is never touched."""
    path = tmp_path / "chat.json"
    live = tmp_path / f".chat.json.{'0' * 16}.saving.tmp"
    lookalike = tmp_path / ".chat.json.notes.saving.tmp"
    lookalike.write_text("mine")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, time
        descriptor = os.open({str(live)!r}, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        print("holding", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        chat = Conversation(ScriptedModel([]))
        chat.messages = conversation_contents("A")[:4]
        chat.save(path)
        assert temporaries(path) == sorted([live.name, lookalike.name])  # the live save's file stays
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        chat.save(path)
        assert temporaries(path) == [lookalike.name]  # the dead one's goes
        assert Conversation.load(path, ScriptedModel([])).messages == chat.messages
    finally:
        holder.kill()
        holder.wait(timeout=30)


# -- the batch ---------------------------------------------------------------------------------------------------
def echo(body: dict[str, Any]) -> Action:
    return reply(f"Answer to {body['messages'][-1]['content']}")


def echo_failing_once(failed: set[str]) -> Any:
    """An answer per prompt; the prompts of every 50th item fail once (400), so that reruns retry failures too."""

    def handle(body: dict[str, Any]) -> Action:
        prompt = body["messages"][-1]["content"]
        if int(prompt.split()[1].rstrip("?")) % 50 == 0 and prompt not in failed:
            failed.add(prompt)
            return {"status": 400, "body": {"error": {"message": "not now"}}}
        return echo(body)

    return handle


def batch_command(items: Path, out: Path, base_url: str) -> list[str]:
    return [sys.executable, "-m", "functionary_agent.cli", "batch", str(items), "-o", str(out), "--base-url",
            base_url, "--concurrency", "16"]


def whole_lines(out: Path) -> tuple[list[dict[str, Any]], int]:
    """The output's whole lines, parsed (each must parse), and the length of a torn last line (0 if none)."""
    data = out.read_bytes() if out.exists() else b""
    end = data.rfind(b"\n") + 1
    return [json.loads(line) for line in data[:end].splitlines()], len(data) - end


def run_until_killed(command: list[str], out: Path, lines_more: int, env: dict[str, str]) -> bool:
    """Run the batch until the output holds `lines_more` more lines, then SIGKILL it; False if it finished."""
    before = len(whole_lines(out)[0])
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            if out.exists() and out.read_bytes().count(b"\n") >= before + lines_more:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=30)
                return True
            time.sleep(0.005)
        assert process.poll() is not None, "the batch run neither finished nor wrote"
        return False
    finally:
        process.kill()
        process.wait(timeout=30)


def test_a_batch_killed_at_random_points_then_resumed_answers_every_item_exactly_once(tmp_path: Path) -> None:
    ids = [f"q{i}" for i in range(200)]
    items = tmp_path / "in.jsonl"
    items.write_text("".join(json.dumps({"id": key, "prompt": f"Question {key[1:]}?"}) + "\n" for key in ids))
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNCTIONARY_")}
    rng = random.Random(26)
    kills = torn = 0
    with ScriptedServer(handler=echo_failing_once(set())) as server:
        command = batch_command(items, out, server.base_url)
        while kills < 5 and run_until_killed(command, out, rng.randint(5, 40), env):
            kills += 1
            written, tail = whole_lines(out)  # every whole line parses
            torn += tail > 0
            assert len({record["id"] for record in written}) == len(written), "an id written twice"
        for _ in range(3):  # the resumes: a run that met a failing-once item exits 1, the next one retries it
            answered_before = sum(record["error"] is None for record in whole_lines(out)[0])
            final = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
            assert f"{answered_before} skipped (answered before)" in final.stderr, final.stderr
            if final.returncode != 1:
                break
    assert final.returncode == 0, final.stderr
    records, tail = whole_lines(out)
    print(f"\nbatch: {kills} kills, {torn} left a torn last line; {final.stderr.strip()}")
    assert tail == 0 and kills >= 3
    assert sorted(record["id"] for record in records) == sorted(ids)  # every item exactly once
    assert all(r["error"] is None and r["answer"] == f"Answer to Question {r['id'][1:]}?" for r in records)


def test_a_writer_killed_mid_line_leaves_a_torn_line_that_the_rerun_cuts(tmp_path: Path) -> None:
    """Deterministically torn: the file-size limit stops a `BatchOutput.write` half way through its line, and the
    process is then SIGKILLed; the rerun cuts the partial line and answers that item again, once."""
    ids = [f"q{i}" for i in range(20)]
    items = tmp_path / "in.jsonl"
    items.write_text("".join(json.dumps({"id": key, "prompt": f"Question {key[1:]}?"}) + "\n" for key in ids))
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps({"id": key, "answer": f"Answer to Question {key[1:]}?", "error": None}) + "\n"
                           for key in ids[:5]))
    child = textwrap.dedent(f"""
        import os, resource, signal
        from functionary_agent.batch import BatchOutput
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit is then short, then EFBIG
        with BatchOutput({str(out)!r}) as output:
            resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize({str(out)!r}) + 30,) * 2)
            try:
                output.write({{"id": "q5", "answer": "Answer to Question 5?", "error": None, "pad": "x" * 500}})
            except OSError:
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    killed = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert whole_lines(out)[1] == 30  # a real torn last line, left by a killed writer
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNCTIONARY_")}
    with ScriptedServer(handler=echo) as server:
        rerun = subprocess.run(batch_command(items, out, server.base_url), capture_output=True, text=True,
                               timeout=120, env=env, cwd=ROOT)
        asked = sorted(request["messages"][-1]["content"] for request in server.requests)
    assert rerun.returncode == 0 and "5 skipped (answered before)" in rerun.stderr, rerun.stderr
    assert "ended in a partial line" in rerun.stderr and "it was cut" in rerun.stderr  # said, not done quietly
    assert asked == sorted(f"Question {key[1:]}?" for key in ids[5:])  # q5 asked again, the answered ones not
    records, tail = whole_lines(out)
    assert tail == 0 and sorted(r["id"] for r in records) == sorted(ids)
    assert {r["id"]: r for r in records}["q5"].get("pad") is None  # the torn q5 is gone, the new one whole
