"""The remote-kernel backend against a real Jupyter Kernel Gateway on 127.0.0.1: the same behaviour as the local
sandbox (state, errors, timeouts, restarts, output bounds, images, reset, close) and clear errors for a wrong
token, an unreachable or redirecting gateway, and a gateway that dies during a cell. All traffic stays on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("kernel_gateway")
pytest.importorskip("httpx")
pytest.importorskip("websockets")
import httpx

from functionary_agent import Conversation
from functionary_agent.events import ToolResult
from functionary_agent.testing import ScriptedModel, call
from sandbox import KernelSandbox, KernelStartError, SandboxConfigurationError
from sandbox.kernel_holder import RESTARTED
from sandbox.output import omitted_marker
from tests.processes import process_gone

TOKEN = "kg-test-token-7d1e"
MAX_CHARS = 2_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Gateway:
    """A `jupyter-kernel-gateway` process on 127.0.0.1 in its own session (so its kernels die with it)."""

    def __init__(self, folder: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "gateway.log"
        env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(folder / "runtime"), "JUPYTER_DATA_DIR": str(folder / "data")}
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kernel_gateway", "--KernelGatewayApp.ip=127.0.0.1",
                 f"--KernelGatewayApp.port={self.port}", "--KernelGatewayApp.port_retries=0",
                 f"--KernelGatewayApp.auth_token={TOKEN}", "--JupyterWebsocketPersonality.list_kernels=True",
                 # the sandbox bounds output itself; the server's rate limit would drop what it considers too much
                 "--ZMQChannelsWebsocketConnection.iopub_data_rate_limit=0",
                 "--ZMQChannelsWebsocketConnection.iopub_msg_rate_limit=0"],
                cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self._wait_until_up()

    def _wait_until_up(self, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/api", headers=self.headers, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"the gateway did not answer within {within} s: {self.log.read_text()[-2000:]}")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {TOKEN}"}

    def kernel_ids(self) -> set[str]:
        response = httpx.get(f"{self.url}/api/kernels", headers=self.headers, timeout=5)
        response.raise_for_status()
        return {kernel["id"] for kernel in response.json()}

    def kill(self) -> None:
        """SIGKILL to the whole session: the gateway and every kernel it started."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        assert process_gone(self.process.pid)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    server = Gateway(tmp_path_factory.mktemp("gateway"))
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def box(gateway: Gateway) -> Iterator[KernelSandbox]:
    with KernelSandbox(gateway_url=gateway.url, token=TOKEN, timeout=20, max_output_chars=MAX_CHARS) as sandbox:
        sandbox.start()
        yield sandbox


# -- the same behaviour as the local backend ---------------------------------------------------------------------
def test_state_persists_across_cells(box: KernelSandbox) -> None:
    box.execute("counter = 41")
    result = box.execute("counter += 1\ncounter")
    assert result.ok and result.result == "42" and result.to_model_text() == "42"
    assert box.ready and box.kernel_pid is None
    assert box.isolation.mode == "gateway" and not box.isolation.contained and box.data_path == str(box.workdir)


def test_error_cell_gives_a_plain_traceback(box: KernelSandbox) -> None:
    result = box.execute("def ratio(a, b):\n    return a / b\n\nratio(1, 0)")
    assert not result.ok and result.error is not None
    assert result.error.ename == "ZeroDivisionError" and result.error.evalue == "division by zero"
    assert "ratio(1, 0)" in result.error.traceback and "\x1b[" not in result.error.traceback
    assert result.to_model_text().endswith("ZeroDivisionError: division by zero")


def test_timeout_interrupts_and_the_kernel_keeps_its_state(box: KernelSandbox) -> None:
    box.execute("kept = 'still here'")
    start = time.monotonic()
    result = box.execute("import time\ntime.sleep(1000)", timeout=1)
    assert time.monotonic() - start < 1 + 2
    assert result.timed_out and not result.restarted
    assert result.error is not None and result.error.ename == "KeyboardInterrupt"
    assert "[timed out after 1 s]" in result.to_model_text()
    assert box.execute("kept").result == "'still here'"


def test_cell_that_ignores_interrupts_is_restarted(box: KernelSandbox, gateway: Gateway) -> None:
    box.execute("doomed = 1")
    before = gateway.kernel_ids()
    code = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass"
    start = time.monotonic()
    result = box.execute(code, timeout=1)
    assert time.monotonic() - start < 1 + 2, "the restart happens in the background"
    assert result.timed_out and result.restarted
    assert "timed out after 1 s" in result.to_model_text() and RESTARTED in result.to_model_text()
    assert box.execute("'doomed' in globals()").result == "False"
    assert gateway.kernel_ids() == before, "restarted through the gateway: the same kernel, nothing left over"


def test_cancelling_aexecute_interrupts_the_cell(box: KernelSandbox) -> None:
    async def scenario() -> str | None:
        await box.aexecute("survivor = 'kept'")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(box.aexecute("import time\ntime.sleep(100)"), 0.5)
        return (await box.aexecute("survivor", timeout=5)).result

    assert asyncio.run(scenario()) == "'kept'"


def test_kernel_death_is_reported_and_the_next_cell_runs(box: KernelSandbox) -> None:
    result = box.execute("import os\nos._exit(3)")
    assert result.kernel_died and result.restarted and not result.ok
    assert f"the kernel died (the gateway reports it restarting); {RESTARTED}" in result.to_model_text()
    assert box.execute("6 * 7").result == "42"


def test_websocket_dropped_between_cells_is_reopened_with_state_kept(box: KernelSandbox) -> None:
    box.execute("still_there = 'yes'")
    kernel = box._engine._kernel  # type: ignore[attr-defined]  # as if a proxy closed the idle connection
    box._loop.call(kernel._ws.close())
    deadline = time.monotonic() + 5
    while kernel.alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not kernel.alive()
    result = box.execute("still_there")
    assert result.result == "'yes'" and not result.restarted and not result.notes


def test_million_lines_are_cut_head_and_tail_like_the_local_backend(box: KernelSandbox) -> None:
    code = "for i in range(10**6):\n    print(i)"
    full = "".join(f"{i}\n" for i in range(10**6))
    half = MAX_CHARS // 2
    expected = full[:half] + omitted_marker(len(full) - MAX_CHARS) + full[-(MAX_CHARS - half) :]
    assert box.execute(code).stdout == expected
    try:
        local = KernelSandbox(max_output_chars=MAX_CHARS)
    except Exception as exc:  # no containment on this machine: the formula above still holds
        pytest.skip(f"no local sandbox here to compare with: {exc}")
    with local:
        assert local.execute(code).stdout == expected


def test_huge_result_is_cut_like_the_local_backend(box: KernelSandbox) -> None:
    result = box.execute("'y' * 5_000_000")
    assert result.result is not None and "characters omitted" in result.result
    assert len(result.result) < MAX_CHARS + 200


def test_matplotlib_figure_comes_back_as_a_saved_png(box: KernelSandbox) -> None:
    result = box.execute("import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.title('squares')\nplt.show()")
    assert result.ok, result.to_model_text()
    assert len(result.images) == 1
    image = result.images[0]
    assert image.parent == box.workdir and image.suffix == ".png"
    assert image.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert f"[image saved: {box.data_path}/{image.name}]" in result.to_model_text()
    assert result.files == []


def test_reset_clears_state(box: KernelSandbox) -> None:
    box.execute("before_reset = 1")
    box.reset()
    assert box.execute("'before_reset' in globals()").result == "False"


def test_close_deletes_the_kernel_on_the_gateway(gateway: Gateway) -> None:
    before = gateway.kernel_ids()
    sandbox = KernelSandbox(gateway_url=gateway.url, token=TOKEN)
    sandbox.start_background()
    assert sandbox.execute("1 + 1").result == "2"
    started = gateway.kernel_ids() - before
    assert len(started) == 1
    workdir = sandbox.workdir
    sandbox.close()
    assert sandbox.closed and not workdir.exists()
    assert not started & gateway.kernel_ids()


def test_conversation_runs_python_through_the_gateway(gateway: Gateway) -> None:
    model = ScriptedModel([
        {"tool_calls": [call("python", {"code": "import os\nanswer = 6 * 7\nprint(answer, os.getpid())"}, id="c1")]},
        "done",
    ])
    before = gateway.kernel_ids()
    with Conversation(model, code_interpreter={"gateway_url": gateway.url, "token": TOKEN, "timeout": 20}) as chat:
        events = list(chat.stream("compute"))
        assert len(gateway.kernel_ids() - before) == 1
    result = next(e for e in events if isinstance(e, ToolResult))
    assert not result.is_error and result.content.startswith("42 ")
    assert int(result.content.split()[1]) != os.getpid()
    assert gateway.kernel_ids() == before, "closing the conversation deletes its kernel"


# -- clear errors ------------------------------------------------------------------------------------------------
def test_wrong_token_is_a_clear_start_error(gateway: Gateway) -> None:
    with KernelSandbox(gateway_url=gateway.url, token="not-the-token") as wrong, pytest.raises(
        KernelStartError, match="token"
    ) as caught:
        wrong.execute("1")
    assert gateway.url in str(caught.value) and "401" in str(caught.value)


def test_unreachable_gateway_fails_fast(gateway: Gateway) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with KernelSandbox(gateway_url=url) as sandbox, pytest.raises(KernelStartError, match="cannot reach") as caught:
        sandbox.start()
    assert time.monotonic() - start < 3
    assert url in str(caught.value)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:21", "file:///etc/passwd", "ws://127.0.0.1:8888", "127.0.0.1:8888",
                                 "http://user:pw@127.0.0.1:8888", "http://127.0.0.1:8888/?token=x", "http://"])
def test_non_http_urls_are_refused(url: str) -> None:
    with pytest.raises(SandboxConfigurationError, match="gateway_url"):
        KernelSandbox(gateway_url=url)


def test_local_only_settings_are_refused_with_a_gateway() -> None:
    with pytest.raises(SandboxConfigurationError, match="memory_mb, network cannot be set with gateway_url"):
        KernelSandbox(gateway_url="http://127.0.0.1:1", memory_mb=4096, network=True)
    with pytest.raises(SandboxConfigurationError, match="gateway settings"):
        KernelSandbox(token="abc")


def test_redirect_is_not_followed_and_the_token_stays_home() -> None:
    seen: list[str | None] = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._record()

        def do_POST(self) -> None:
            self._record()

        def _record(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)
    target = f"http://127.0.0.1:{other.server_address[1]}"

    class Redirect(Elsewhere):
        def _record(self) -> None:
            self.send_response(307)
            self.send_header("Location", target + self.path)
            self.end_headers()

    first = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    for server in (other, first):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{first.server_address[1]}"
        with KernelSandbox(gateway_url=url, token=TOKEN) as sandbox, pytest.raises(KernelStartError) as caught:
            sandbox.start()
        assert "redirect" in str(caught.value) and target in str(caught.value)
        assert seen == [], "nothing, and no token, may reach another origin"
    finally:
        for server in (other, first):
            server.shutdown()
            server.server_close()


def test_gateway_dying_during_a_cell_is_a_result_then_a_start_error(tmp_path: Path) -> None:
    own = Gateway(tmp_path)
    try:
        with KernelSandbox(gateway_url=own.url, token=TOKEN, timeout=30) as sandbox:
            sandbox.start()
            killer = threading.Timer(0.5, own.kill)
            killer.start()
            start = time.monotonic()
            result = sandbox.execute("import time\ntime.sleep(60)")
            killer.join()
            assert time.monotonic() - start < 5
            assert result.kernel_died and not result.ok
            assert "lost the connection to the kernel gateway" in result.to_model_text()
            start = time.monotonic()
            with pytest.raises(KernelStartError, match="cannot reach the kernel gateway"):
                sandbox.execute("1")
            assert time.monotonic() - start < 5
    finally:
        own.kill()
