"""Batch runs on Ray: the items are cut into shards, each shard is a Ray task that answers its items on its own
event loop (`concurrency` at a time, with `runner.answer_items` as a run on one machine does) and streams each record
back as it is done (a Ray generator task). The driver is the only writer of the output file (`output.BatchOutput`),
so resuming works as for the asyncio run, and it drops a record whose id is answered already. The settings and
items travel pickled: `functionary_agent.batch.settings.BatchSettings` and `.items.BatchItem` are found on the
worker by those module paths.

Tools travel as source text with each shard task: each tools *file* is read on the driver and written out on the
worker before it is loaded there, so workers run exactly the driver's version. Not Ray's `runtime_env`
(`py_modules`): Ray takes local files there only when the Ray session is started (`ray.init`), so a process that
joins a session already under way (a notebook, a Ray job, a test) could not ship them. A tools *module* name is
imported on the worker as it is: it must be installed there. `functionary_agent` itself must be installed on every
node, in the same version. A tools file that imports modules beside it needs them shipped too: run the command as a
Ray job with that folder (`ray job submit --working-dir DIR -- functionary-agent batch ... --ray`), whose runtime
environment every task inherits.

A shard whose worker dies (killed, out of memory, its node gone) is not retried by Ray: Ray replays a generator
task from its start and assumes it yields the same values in the same order, which items finishing in completion
order do not. The driver instead sends the shard's items it has not received again, as a new shard, up to
`shard_retries` times; after that each is written as failed (`WorkerCrashedError`, ...). An item is never silently
missing and never written twice.

    from functionary_agent.batch import BatchSettings, read_items
    from functionary_agent.batch.ray import run_batch_on_ray

    run_batch_on_ray(read_items("in.jsonl"), "out.jsonl", BatchSettings(tools=("tools.py",), base_url=URL),
                     address="auto", concurrency=16)

Needs `pip install "functionary-agent[ray]"`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import importlib
import logging
import math
import os
import queue
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from functionary_agent import _sync
from functionary_agent.batch.items import BatchItem, check_items, resolve_output_types
from functionary_agent.batch.output import BatchOutput, Record
from functionary_agent.batch.runner import BatchSummary, answer_items, failure_record
from functionary_agent.batch.settings import BatchSettings
from functionary_agent.errors import ConfigurationError

logger = logging.getLogger(__name__)
_CONNECT_TIMEOUT = 5.0
_SHARDS_PER_CPU = 4  # more, smaller shards: less work lost to a dead worker, better balance at the end
_END = object()


def import_ray() -> Any:
    """The `ray` module, imported now; `ConfigurationError` naming the extra to install when it is missing."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise ConfigurationError("Ray is not installed: pip install 'functionary-agent[ray]'") from None


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[Any]:
    """Join the Ray cluster at `address` (HOST:PORT, ray://HOST:PORT, or "auto"; None: a cluster this machine
    runs, else a new local Ray) and leave it afterwards, stopping a local Ray started here. Inside a process that
    already called `ray.init`, that session is used and left alone. Yields the `ray` module.
    An address that cannot be reached is a `ConfigurationError` within seconds (Ray itself would wait)."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address not in (None, "auto", "local"):
        _check_reachable(address)
    options: dict[str, Any] = {"include_dashboard": False} if address in (None, "local") else {}
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigurationError(f"cannot join the Ray cluster at {address}: {exc}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not host or not port.isdigit():
        raise ConfigurationError(f"Ray address {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise ConfigurationError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


def answer_on_ray(
    items: list[BatchItem], settings: BatchSettings, *, deliver: Callable[[Record], object], concurrency: int = 16,
    shard_size: int | None = None, shard_retries: int = 3,
) -> None:
    """Answer `items` on the Ray session this process has joined, handing every record to `deliver` as it
    arrives (in the driver, one at a time). `shard_size` defaults to 4 shards per CPU of the cluster."""
    if concurrency < 1:
        raise ConfigurationError(f"concurrency must be at least 1, got {concurrency}")
    if not items:
        return
    ray = import_ray()
    if shard_size is None:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        shard_size = math.ceil(len(items) / (cpus * _SHARDS_PER_CPU))
    driver = _ShardDriver(ray, settings, concurrency, deliver, shard_retries)
    for start in range(0, len(items), shard_size):
        driver.submit(items[start : start + shard_size], attempt=0)
    driver.run()


def run_batch_on_ray(
    items: Iterable[BatchItem | Mapping[str, Any]], output: str | os.PathLike[str], settings: BatchSettings, *,
    address: str | None = None, concurrency: int = 16, shard_size: int | None = None,
    on_result: Callable[[Record], object] | None = None,
) -> BatchSummary:
    """`functionary_agent.batch.run_batch` on Ray: same items, output file, resume rule and summary."""
    checked = check_items(items, conversation=settings)
    started = time.perf_counter()
    with ray_session(address), BatchOutput(output) as out:
        todo = out.pending(checked)

        def deliver(record: Record) -> None:
            if out.write(record) and on_result is not None:
                on_result(record)

        answer_on_ray(todo, settings, deliver=deliver, concurrency=concurrency, shard_size=shard_size)
    return BatchSummary(len(checked), len(checked) - len(todo), out.answered, out.failed,
                        time.perf_counter() - started)


class _ShardDriver:
    """Submits shards, takes their records as they come, and sends again what a dead worker did not finish."""

    def __init__(self, ray: Any, settings: BatchSettings, concurrency: int, deliver: Callable[[Record], object],
                 shard_retries: int) -> None:
        self._ray = ray
        self._task = ray.remote(num_cpus=1, max_retries=0)(answer_shard)
        self._settings, self._sources = ship_tools(settings)
        self._concurrency, self._deliver, self._retries = concurrency, deliver, shard_retries
        self._running: dict[Any, tuple[dict[str, BatchItem], int]] = {}  # generator -> (items waited for, attempt)

    def submit(self, items: list[BatchItem], attempt: int) -> None:
        generator = self._task.remote(self._settings, self._sources, items, self._concurrency)
        self._running[generator] = ({item.key: item for item in items}, attempt)

    def run(self) -> None:
        try:
            while self._running:
                ready, _ = self._ray.wait(list(self._running), num_returns=1, timeout=1.0)
                for generator in ready:
                    self._advance(generator)
        finally:  # Ctrl-C or a failed write: stop the shards still running
            for generator in self._running:
                with contextlib.suppress(Exception):
                    self._ray.cancel(generator, force=True)

    def _advance(self, generator: Any) -> None:
        waiting, attempt = self._running[generator]
        try:
            record = self._ray.get(next(generator))
        except StopIteration:
            del self._running[generator]
            self._fail(waiting, "ShardEnded", "its shard ended without an answer for it")
        except self._ray.exceptions.RayTaskError as exc:  # our code raised on the worker: a retry would too
            del self._running[generator]
            cause = getattr(exc, "cause", None) or exc
            if waiting:  # one line for the whole shard (a tools file that does not import there, say)
                logger.warning("a shard failed on its Ray worker, %d items written as failed: %s: %s",
                               len(waiting), type(cause).__name__, str(cause).splitlines()[0] if str(cause) else "")
            self._fail(waiting, type(cause).__name__, str(cause))
        except self._ray.exceptions.RayError as exc:  # the worker or its node died
            del self._running[generator]
            if waiting and attempt < self._retries:
                logger.warning("a Ray worker failed (%s); sending %d items again", type(exc).__name__, len(waiting))
                self.submit(list(waiting.values()), attempt + 1)
            else:
                self._fail(waiting, type(exc).__name__, f"{exc} (after {attempt + 1} attempts)")
        else:
            waiting.pop(BatchItem(record["id"]).key, None)
            self._deliver(record)

    def _fail(self, waiting: dict[str, BatchItem], kind: str, message: str) -> None:
        for item in waiting.values():
            self._deliver(failure_record(item, kind, message))
        waiting.clear()


def ship_tools(settings: BatchSettings) -> tuple[BatchSettings, tuple[tuple[str, str], ...]]:
    """Settings for a worker: tools files become (file name, source text) pairs, module names stay as they are,
    and the server, model name and key come from this process's environment where the settings leave them out
    (the key is sent to the workers only with the server it is for)."""
    files = [spec for spec in settings.tools if Path(spec).is_file()]
    sources = tuple((Path(spec).name, Path(spec).read_text(encoding="utf-8")) for spec in files)
    modules = tuple(spec for spec in settings.tools if spec not in files)
    return dataclasses.replace(settings.resolved(), tools=modules), sources


def answer_shard(
    settings: BatchSettings, sources: tuple[tuple[str, str], ...], items: list[BatchItem], concurrency: int
) -> Iterator[Record]:
    """A Ray generator task: answer `items` on this worker and yield each record as it is done."""
    settings = dataclasses.replace(settings, tools=(*_write_sources(sources), *settings.tools))
    records: queue.SimpleQueue[Any] = queue.SimpleQueue()

    async def run() -> None:
        output_types = resolve_output_types(items, settings.tools)
        async with settings.conversations() as make:
            await answer_items(items, make, concurrency, records.put, output_types)

    # the process's background loop (as sync calls use), so HTTP pools live as long as the worker
    done = asyncio.run_coroutine_threadsafe(run(), _sync._background_loop())
    done.add_done_callback(lambda _: records.put(_END))
    try:
        while (record := records.get()) is not _END:
            yield record
        done.result()  # raises what stopped the shard, after what it finished
    finally:
        done.cancel()


def _write_sources(sources: tuple[tuple[str, str], ...]) -> list[str]:
    """Tools files as the driver read them, written under this machine's temp folder (by content, so a worker
    that runs several shards writes each once)."""
    paths = []
    for name, text in sources:
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        folder = Path(tempfile.gettempdir()) / "functionary-agent-tools" / digest
        path = folder / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f".{name}.{os.getpid()}"
            partial.write_text(text, encoding="utf-8")
            partial.replace(path)  # whole, even with two workers of one machine writing it at once
        paths.append(str(path))
    return paths
