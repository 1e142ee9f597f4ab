"""Batch runs on a real local Ray (2 CPUs, one session for the module): the same answers as the asyncio run, a
worker killed mid-shard loses nothing, and a cluster out of reach is a clear usage error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from functionary_agent.batch import BatchSettings, run_batch
from tests.openai_server import ScriptedServer
from tests.test_batch import (
    TOOLS,
    TYPED_TOOLS,
    SlowServer,
    city_items,
    city_record,
    cli,
    results,
    weather,
    write_items,
)
from tests.test_batch_edges import TYPES_ONLY

ray = pytest.importorskip("ray")

from functionary_agent.batch.ray import run_batch_on_ray  # noqa: E402 - needs ray

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def answers(path: Path) -> dict[Any, Any]:
    records = results(path)
    assert len({json.dumps(r["id"]) for r in records}) == len(records), "every id once"
    return {record["id"]: record["answer"] for record in records}


def test_ray_gives_the_answers_the_asyncio_run_gives(ray_address: str, tmp_path: Path) -> None:
    (tmp_path / "tools.py").write_text(TOOLS)
    items = [*city_items(30), {"id": 7, "prompt": "FAIL here"}]
    with ScriptedServer(handler=weather) as server:
        settings = BatchSettings(tools=(str(tmp_path / "tools.py"),), base_url=server.base_url)
        local = run_batch(items, tmp_path / "local.jsonl", conversation=settings, concurrency=8)
        on_ray = run_batch_on_ray(items, tmp_path / "ray.jsonl", settings, concurrency=8, shard_size=8)
    assert (on_ray.answered, on_ray.failed) == (local.answered, local.failed) == (30, 1)
    assert answers(tmp_path / "ray.jsonl") == answers(tmp_path / "local.jsonl")
    failed = [r for r in results(tmp_path / "ray.jsonl") if r["error"]]
    assert [(r["id"], r["error"]["type"]) for r in failed] == [(7, "ModelError")]


def test_a_worker_killed_mid_shard_loses_nothing_and_duplicates_nothing(ray_address: str, tmp_path: Path) -> None:
    marker = tmp_path / "killed-once"
    (tmp_path / "deadly_tools.py").write_text(
        "import os, signal\nfrom pathlib import Path\n\n"
        "def lookup(city: str) -> str:\n"
        '    """The weather in a city; kills its own process the first time it is asked about city5."""\n'
        f"    marker = Path({str(marker)!r})\n"
        '    if city == "city5" and not marker.exists():\n'
        '        marker.write_text("x")\n'
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        '    return f"{city}: 21 C"\n'
    )
    with ScriptedServer(handler=weather) as server:
        settings = BatchSettings(tools=(str(tmp_path / "deadly_tools.py"),), base_url=server.base_url)
        summary = run_batch_on_ray(city_items(16), tmp_path / "out.jsonl", settings, concurrency=2, shard_size=8)
        # the kill may cut another item's request after its headers: the server drops it (server.cut_requests),
        # never logs it, and the shard's retry sends it again whole
        asked_city5 = [r for r in server.requests if r["messages"][-1]["content"] == "Weather in city5?"]
    assert marker.exists() and len(asked_city5) == 2, "the worker was killed, and its shard sent again"
    assert answers(tmp_path / "out.jsonl") == {f"q{i}": f"Answer: city{i}: 21 C" for i in range(16)}
    assert (summary.answered, summary.failed) == (16, 0)


def test_workers_find_the_output_type_in_the_shipped_tools_file(ray_address: str, tmp_path: Path) -> None:
    (tmp_path / "typed_tools.py").write_text(TYPED_TOOLS)
    items = [{"id": "city", "prompt": "Lyon has 520,000 people.", "output_type": "City"}]
    with ScriptedServer(handler=city_record) as server:
        settings = BatchSettings(tools=(str(tmp_path / "typed_tools.py"),), base_url=server.base_url)
        summary = run_batch_on_ray(items, tmp_path / "out.jsonl", settings, concurrency=2)
    assert (summary.answered, summary.failed) == (1, 0)
    assert answers(tmp_path / "out.jsonl") == {"city": {"name": "Lyon", "population": 520000}}


def test_a_tools_file_of_types_only_reaches_the_workers_as_types_and_no_tools(
    ray_address: str, tmp_path: Path
) -> None:
    (tmp_path / "types.py").write_text(TYPES_ONLY)
    items = [{"id": "city", "prompt": "Lyon has 520,000 people.", "output_type": "City"},
             {"id": "count", "prompt": "How many?", "output_type": "int"}]  # its shard names no type of the file
    with ScriptedServer(handler=city_record) as server:
        settings = BatchSettings(tools=(str(tmp_path / "types.py"),), base_url=server.base_url)
        summary = run_batch_on_ray(items, tmp_path / "out.jsonl", settings, concurrency=2, shard_size=1)
    assert (summary.answered, summary.failed) == (2, 0)
    assert answers(tmp_path / "out.jsonl") == {"city": {"name": "Lyon", "population": 520000}, "count": 7}
    assert {t["function"]["name"] for r in server.requests for t in r.get("tools", [])} == {"final_result"}


def test_a_tools_file_importing_its_neighbour_runs_in_a_session_with_its_folder(
    ray_address: str, tmp_path: Path
) -> None:
    """As `ray job submit --working-dir DIR` does: a driver whose Ray session has the folder as its working_dir."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "weather_data.py").write_text('def temperature(city: str) -> str:\n    return f"{city}: 21 C"\n')
    (folder / "tools.py").write_text(
        "from weather_data import temperature\n\n\n"
        "def lookup(city: str) -> str:\n"
        '    """The weather in a city."""\n'
        "    return temperature(city)\n"
    )
    write_items(tmp_path / "in.jsonl", city_items(4))
    driver = (
        "import ray, sys\n"
        "from functionary_agent.batch import BatchSettings, read_items\n"
        "from functionary_agent.batch.ray import run_batch_on_ray\n"
        f"ray.init(address={ray_address!r}, runtime_env={{'working_dir': {str(folder)!r}}}, log_to_driver=False)\n"
        f"settings = BatchSettings(tools=({str(folder / 'tools.py')!r},), base_url=sys.argv[1])\n"
        f"print(run_batch_on_ray(read_items({str(tmp_path / 'in.jsonl')!r}), {str(tmp_path / 'out.jsonl')!r}, "
        "settings, concurrency=2))\n"
    )
    with ScriptedServer(handler=weather) as server:
        done = subprocess.run([sys.executable, "-c", driver, server.base_url], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert answers(tmp_path / "out.jsonl") == {f"q{i}": f"Answer: city{i}: 21 C" for i in range(4)}


def test_a_tools_file_that_fails_to_import_on_the_workers_fails_its_items_with_the_reason(
    ray_address: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tools = tmp_path / "driver_only_tools.py"
    only_here = f"\nimport os\nif os.getpid() != {os.getpid()}:\n    raise RuntimeError('no weather here')\n"
    tools.write_text(TOOLS + only_here)  # imports in this process, fails in any other
    settings = BatchSettings(tools=(str(tools),), base_url="http://127.0.0.1:9/v1")
    summary = run_batch_on_ray(city_items(6), tmp_path / "out.jsonl", settings, concurrency=2, shard_size=3)
    assert (summary.answered, summary.failed) == (0, 6)
    errors = {record["id"]: record["error"] for record in results(tmp_path / "out.jsonl")}
    assert set(errors) == {f"q{i}" for i in range(6)}
    assert all(e["type"] == "ConfigurationError" and "RuntimeError: no weather here" in e["message"]
               for e in errors.values())
    warnings = [r.getMessage() for r in caplog.records if "shard failed on its Ray worker" in r.getMessage()]
    assert len(warnings) == 2 and "3 items written as failed: ConfigurationError: importing" in warnings[0]


def test_the_command_line_joins_a_cluster_by_address(ray_address: str, tmp_path: Path) -> None:
    (tmp_path / "tools.py").write_text(TOOLS)
    items = write_items(tmp_path / "in.jsonl", city_items(6))
    with ScriptedServer(handler=weather) as server:
        done = cli(str(items), "--tools", str(tmp_path / "tools.py"), "-o", str(tmp_path / "out.jsonl"),
                   "--base-url", server.base_url, "--ray", ray_address)
    assert done.returncode == 0, done.stderr
    assert answers(tmp_path / "out.jsonl") == {f"q{i}": f"Answer: city{i}: 21 C" for i in range(6)}
    assert done.stderr.splitlines()[-1].startswith("batch done in ")


def test_ctrl_c_cancels_the_shards_and_a_rerun_finishes(ray_address: str, tmp_path: Path) -> None:
    (tmp_path / "tools.py").write_text(TOOLS)
    items = write_items(tmp_path / "in.jsonl", city_items(80))
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNCTIONARY_")}
    with SlowServer(weather, latency=0.2) as server:
        args = [str(items), "--tools", str(tmp_path / "tools.py"), "-o", str(out), "--base-url", server.base_url,
                "--ray", ray_address, "--concurrency", "2"]
        process = subprocess.Popen([sys.executable, "-m", "functionary_agent.cli", "batch", *args],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 130, stderr
        assert 3 <= len(answers(out)) < 80 and "run the same command again to resume" in stderr
        server.latency = 0
        rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert answers(out) == {f"q{i}": f"Answer: city{i}: 21 C" for i in range(80)}


def test_an_unreachable_ray_address_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "tools.py").write_text(TOOLS)
    items = write_items(tmp_path / "in.jsonl", city_items(2))
    out = tmp_path / "out.jsonl"
    done = cli(str(items), "--tools", str(tmp_path / "tools.py"), "-o", str(out), "--base-url",
               "http://127.0.0.1:9/v1", "--ray", "127.0.0.1:1")
    assert done.returncode == 2 and not out.exists()
    assert done.stderr == "functionary-agent: error: cannot reach the Ray cluster at 127.0.0.1:1: Connection refused\n"
