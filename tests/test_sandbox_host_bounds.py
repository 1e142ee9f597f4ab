"""What the host takes from a hostile kernel: how many bytes, what shapes of message, and which socket it talks to.

Each test performs the attack with a real kernel (`KernelSandbox`), publishing through the kernel's own session
and sockets the way model code can, except the fuzz test, which feeds random message shapes to the collectors
directly. The floods run in a child process with an address-space cap, so the host's peak memory is measured on
its own and a regression cannot take the machine down.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import select
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox import KernelSandbox
from sandbox.collect import OutputCollector, answers
from sandbox.gateway_engine import RemoteCollector
from sandbox.workdir import ImageSaver
from sandbox.zmtp import Connection, MessageTooLarge

ROOT = Path(__file__).resolve().parents[1]
HOST_PEAK_MB = 300  # the host starts at about 35 MB; the unbounded host reached 2.2 GB on the first flood
FLOOD_ADDRESS_SPACE = 5 * 2**30  # the child's cap: above what an unbounded host needs for these floods

_SEND = (
    "k = get_ipython().kernel\nfor _ in range({count}):\n"
    "    k.session.send(k.iopub_socket, {args}, parent=k.get_parent())\n"
)
FLOODS = {
    # one 128 MB buffer referenced 8 times a message: 1 GB a message at no cost to the kernel
    "zero_copy_buffers": "big = bytes(128 * 2**20)\n" + _SEND.format(
        count=2, args="'stream', {'name': 'stdout', 'text': 'x'}, buffers=[big] * 8"),
    # frames each well under any per-frame cap, many of them in one message
    "many_moderate_frames": "big = bytes(30 * 2**20)\n" + _SEND.format(
        count=1, args="'stream', {'name': 'stdout', 'text': 'x'}, buffers=[big] * 40"),
    # messages each under the per-message cap, many of them in one execution
    "many_large_messages": "big = bytes(30 * 2**20)\n" + _SEND.format(
        count=20, args="'stream', {'name': 'stdout', 'text': 'x'}, buffers=[big]"),
    # JSON that costs more to hold than to send: one emoji makes a 31 MB text four bytes a character
    "wide_unicode_text": _SEND.format(
        count=3, args="'stream', {'name': 'stdout', 'text': '\\U0001F600' + 'a' * (31 * 2**20)}"),
    # and about seventy bytes of Python for every three of `{},`
    "tiny_json_objects": _SEND.format(
        count=3, args="'display_data', {'data': {'application/json': [{}] * (6 * 2**20)}, 'metadata': {}}"),
}

FLOOD_SCRIPT = """
import json, sys
from sandbox import KernelSandbox

def peak_mb():
    return [int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")][0]

floods, report = json.loads(sys.stdin.read()), {}
with KernelSandbox(timeout=60, memory_mb=4096) as box:
    box.start()
    report["start"] = peak_mb()
    for name, cell in floods.items():
        result = box.execute(cell + "print('sent')")
        report[name] = dict(
            peak_mb=peak_mb(), overflowed=result.overflowed, restarted=result.restarted, ok=result.ok,
            stdout=result.stdout[:200], notes=result.notes, next=box.execute("6 * 7").result,
        )
print(json.dumps(report))
"""


def _cap_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (FLOOD_ADDRESS_SPACE, FLOOD_ADDRESS_SPACE))


@pytest.fixture(scope="module")
def floods() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", FLOOD_SCRIPT], input=json.dumps(FLOODS), cwd=ROOT, capture_output=True, text=True,
        timeout=600, preexec_fn=_cap_address_space,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return report


@pytest.mark.parametrize("name", ["zero_copy_buffers", "many_moderate_frames"])
def test_an_oversized_message_is_cut_off_unread_and_the_kernel_restarted(floods: dict[str, Any], name: str) -> None:
    report = floods[name]
    assert report["peak_mb"] < HOST_PEAK_MB, report
    assert report["overflowed"] and report["restarted"] and not report["ok"], report
    assert any("sent a message of more than 32 MB; kernel restarted, state lost" in n for n in report["notes"])
    assert report["next"] == "42", report


def test_an_execution_that_sends_too_much_in_total_is_cut_off(floods: dict[str, Any]) -> None:
    report = floods["many_large_messages"]
    assert report["peak_mb"] < HOST_PEAK_MB, report
    assert report["overflowed"] and report["restarted"], report
    assert report["stdout"].startswith("x") and "sent" not in report["stdout"], report  # the first few got through
    assert any("MB of messages in one execution; kernel restarted, state lost" in n for n in report["notes"])
    assert report["next"] == "42", report


@pytest.mark.parametrize(
    ("name", "why"),
    [("wide_unicode_text", "bytes is not ASCII"), ("tiny_json_objects", "JSON values")],
)
def test_json_that_would_swell_on_the_host_is_dropped_unparsed(floods: dict[str, Any], name: str, why: str) -> None:
    report = floods[name]
    assert report["peak_mb"] < HOST_PEAK_MB, report
    assert not report["overflowed"] and not report["restarted"] and report["stdout"] == "sent\n", report
    assert sum(why in note for note in report["notes"]) == 3, report
    assert report["next"] == "42", report


# A ZMTP peer that never finishes a message: endless PING commands, or endless empty frames of one message.
_PEER_GREETING = b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\0") + bytes(32)
_PEER_READY = b"\x04\x19\x05READY\x0bSocket-Type\x00\x00\x00\x03PUB"
_ENDLESS = {"commands": b"\x04\x07\x04PING\x00\x00", "empty_frames": b"\x01\x00"}


def _serve_endlessly(listener: socket.socket, unit: bytes) -> None:
    connection, _ = listener.accept()
    with connection:
        received = b""
        while len(received) < 64:
            received += connection.recv(64 - len(received))
        try:
            connection.sendall(_PEER_GREETING + _PEER_READY)
            while True:
                connection.sendall(unit * 4096)
        except OSError:
            return  # the host hung up, as it should


@pytest.mark.parametrize("flood", sorted(_ENDLESS))
def test_a_message_that_never_ends_is_cut_off_at_the_cap(tmp_path: Path, flood: str) -> None:
    path = str(tmp_path / "peer.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        peer = threading.Thread(target=_serve_endlessly, args=(listener, _ENDLESS[flood]), daemon=True)
        peer.start()

        async def receive() -> None:
            loop = asyncio.get_running_loop()
            connection = await Connection.open(path, "SUB", 2**20, loop.time() + 10)
            try:
                with pytest.raises(MessageTooLarge):
                    await connection.receive(10)
            finally:
                await connection.aclose()

        asyncio.run(receive())
        peer.join(10)
        assert not peer.is_alive()


# -- malformed messages ------------------------------------------------------------------------------------------
FORGE = dedent("""
    k = get_ipython().kernel
    session, iopub, parent = k.session, k.iopub_socket, k.get_parent()

    def forge(msg_type, body, **changed):
        msg = session.msg(msg_type, body, parent=parent)
        for path, value in changed.items():
            where, _, key = path.partition("__")
            if key:
                msg[where][key] = value
            else:
                msg[where] = value
        session.send(iopub, msg)

    forge("stream", {"name": ["stdout"], "text": "a list for a name"})
    forge("stream", {"name": "stdout", "text": {"not": "text"}})
    forge("error", {"ename": "E", "evalue": "v", "traceback": "a string, not a list"})
    forge("execute_result", {"data": ["not", "a", "bundle"], "metadata": {}, "execution_count": 1})
    forge("display_data", {"data": {"image/png": 42}, "metadata": {}})
    forge("execute_input", {"code": "", "execution_count": "seven"})
    forge("stream", {}, content=b"[1, 2]")
    forge("stream", {"name": "stdout", "text": "x"}, header__msg_type=5)
    forge("stream", {"name": "stdout", "text": "x"}, parent_header=["not", "an", "object"])
    iopub.send_multipart([b"stream", b"<IDS|MSG>", b"f" * 10_000_000, b"{}", b"{}", b"{}", b"{}"])
    iopub.send_multipart([b"stream", b"<IDS|MSG>"])
    print("still here")
    "done"
""")
EXPECTED_NOTES = [
    "malformed stream message: its 'name' is a list, not a string",
    "malformed stream message: its 'text' is an object, not a string",
    "malformed error message: its 'traceback' is not a list of strings",
    "malformed execute_result message: its 'data' is a list, not an object",
    "malformed display_data message: its 'image/png' output is a number, not a string",
    "malformed execute_input message: its 'execution_count' is a string, not a number",
    "malformed stream message: its content is a list, not an object",
    "malformed Jupyter message: its msg_type is a number, not a string",
    "malformed stream message: its parent_header is a list, not an object",
    "malformed Jupyter message: its signature does not match",
]


def test_forged_messages_of_every_malformed_shape_become_notes() -> None:
    with KernelSandbox(timeout=30) as box:
        result = box.execute(FORGE)
        assert result.ok and not result.restarted, result.to_model_text()
        assert result.stdout == "still here\n" and result.result == "'done'", result.to_model_text()
        for expected in EXPECTED_NOTES:
            assert any(expected in note for note in result.notes), (expected, result.notes)
        assert "1 more notes like these were left out" in result.notes[-1]  # the 11th: too few parts
        assert box.execute("6 * 7").result == "42"


_leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.binary(max_size=8)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_anything = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner) | st.dictionaries(_leaves, inner, max_size=4),
    max_leaves=12,
)
_MIMES = ["text/plain", "image/png", "image/jpeg", "image/svg+xml", "application/json", "text/html"]
_FIELDS = ["name", "text", "data", "traceback", "ename", "evalue", "execution_count", "execution_state"]


def _messages(values: st.SearchStrategy[Any], keys: st.SearchStrategy[Any], *, routed: bool) -> st.SearchStrategy[Any]:
    """Messages whose every field is anything `values` makes, near enough to the protocol to reach every branch.
    `routed`: only what the gateway's reader lets through (an object with an object for content and parent)."""
    bundle = st.dictionaries(st.sampled_from(_MIMES) | keys, values | st.just("iVBORw0KGgo="), max_size=4)
    content = st.fixed_dictionaries({}, optional={name: values for name in _FIELDS} | {"data": bundle | values})
    msg_type = st.sampled_from(
        ["stream", "execute_input", "execute_result", "display_data", "update_display_data", "error", "status"]
    )
    parent = st.just({"msg_id": "cell"})
    message = st.fixed_dictionaries({
        "msg_type": msg_type | values,
        "content": content if routed else content | values,
        "parent_header": parent if routed else parent | values,
        "header": values,
    })
    return message if routed else message | values


def test_no_message_shape_makes_a_collector_raise(tmp_path: Path) -> None:
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        shapes=st.lists(_messages(_anything, _leaves, routed=False), max_size=6),
        gateway_shapes=st.lists(_messages(_json, st.text(max_size=8), routed=True), max_size=6),
    )
    def feed(shapes: list[Any], gateway_shapes: list[Any]) -> None:
        local, remote = OutputCollector(ImageSaver(tmp_path), 200), RemoteCollector(ImageSaver(tmp_path), 200)
        for collector, messages in ((local, shapes), (remote, gateway_shapes)):
            for msg in messages:
                if isinstance(msg, dict):
                    answers(msg, "cell", collector)
                collector.add(msg)
            result = collector.finish()
            assert isinstance(result.to_model_text(), str) and len(result.notes) <= 14

    feed()


# -- the socket the host connects to -------------------------------------------------------------------------------
SWAP = dedent("""
    import json, os, socket
    from ipykernel.connect import get_connection_file
    info = json.load(open(get_connection_file()))
    paths = [f"{info['ip']}-{info[name + '_port']}" for name in ("iopub", "shell", "control", "stdin", "hb")]
    for path in paths:
        os.unlink(path)
        os.symlink(TRAP, path)
    dropped = 0
    for fd in map(int, os.listdir("/proc/self/fd")):  # drop the host's connections so that it must connect again
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            if sock.family == socket.AF_UNIX and sock.getsockname() in paths and not listening:
                sock.shutdown(socket.SHUT_RDWR)
                dropped += 1
        except OSError:
            pass
        finally:
            sock.close()
    print(dropped, [os.readlink(path) == TRAP for path in paths])
""")


@pytest.fixture
def trap() -> Iterator[tuple[socket.socket, Path]]:
    """A Unix socket on the host that only the host could reach, in a folder the kernel cannot see."""
    folder = Path(tempfile.mkdtemp(prefix="trap-"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(folder / "trap.sock"))
    listener.listen(8)
    try:
        yield listener, folder / "trap.sock"
    finally:
        listener.close()
        (folder / "trap.sock").unlink()
        folder.rmdir()


def test_a_socket_file_the_kernel_swaps_for_a_link_is_never_followed(trap: tuple[socket.socket, Path]) -> None:
    listener, trap_path = trap
    with KernelSandbox(timeout=10) as box:
        box.start()
        old_pid = box.kernel_pid
        result = box.execute(SWAP.replace("TRAP", repr(str(trap_path))))
        readable, _, _ = select.select([listener], [], [], 1.0)
        assert readable == [], "the host connected to the trap through the kernel's link"
        assert result.restarted and result.kernel_died, result.to_model_text()
        assert "its iopub connection was lost" in result.to_model_text(), result.to_model_text()
        assert box.execute("6 * 7").result == "42" and box.kernel_pid != old_pid


def test_the_host_holds_each_socket_by_its_inode_not_its_name() -> None:
    """What makes the test above pass: the host's connections go through O_PATH descriptors of socket inodes."""
    with KernelSandbox(timeout=10) as box:
        box.start()
        pins = []
        for fd in os.listdir("/proc/self/fd"):
            with_flags = Path(f"/proc/self/fdinfo/{fd}")
            try:
                flags = int(next(line for line in with_flags.read_text().splitlines() if line.startswith("flags:"))
                            .split()[1], 8)
                target = os.readlink(f"/proc/self/fd/{fd}")
            except (OSError, StopIteration):
                continue
            if flags & os.O_PATH and "kernelsandbox-run-" in target and "/kernel/kernel-ipc-" in target:
                pins.append(target)
        assert len(pins) == 2, pins
