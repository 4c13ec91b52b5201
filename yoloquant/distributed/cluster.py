"""Connecting to Ray, and running independent tasks on it.

`--ray_address local` starts a Ray cluster on this machine with `--ray_workers` workers;
any other address (`HOST:PORT` of a running `ray start --head`, `ray://HOST:PORT`, `auto`)
joins that cluster. Without --ray_address nothing here runs and Ray is never imported: this
package imports ray only inside its functions, `connect` first (tests/test_distributed.py checks it).

The work units are independent (one evaluation shard, one conv's measurement, one calibration
draw); the driver submits them, keeps at most `workers` in flight, and gets each result back as
it finishes, so the callers gather and score in one place (the same validator, the same ranking,
the same checkpoint) and the numbers equal the single-process run's.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

from ..errors import ConfigError, YoloQuantError

log = logging.getLogger("yoloquant")

RAY_PIN = "ray==2.60.0"  # the version requirements.txt pins
LOCAL = "local"
CONNECT_TIMEOUT = 3.0  # seconds for the TCP check before ray.init (which can wait for minutes)
DEFAULT_GCS_PORT, DEFAULT_CLIENT_PORT = 6379, 10001
# a task whose worker process died is run again this many times (elsewhere) before the job
# stops; what finished is kept (analysis.py: in its checkpoint)
TASK_RETRIES = 2


def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("distributed (Ray; optional)")
    group.add_argument("--ray_address", default=None, metavar="ADDRESS",
                       help="run the work as Ray tasks: 'local' starts a Ray cluster on this "
                            "machine; HOST:PORT (a `ray start --head` node), ray://HOST:PORT or "
                            "auto joins a running cluster. Absent: one process, no Ray")
    group.add_argument("--ray_workers", type=int, default=None, metavar="N",
                       help="with --ray_address: tasks running at once (default: the cluster's "
                            "CPUs / --ray_threads; with local, the CPUs of this machine)")
    group.add_argument("--ray_threads", type=int, default=1, metavar="T",
                       help="with --ray_address: threads (and CPUs reserved) per task (default 1)")


@dataclass
class Cluster:
    """A connected Ray cluster and how this job uses it."""

    address: str  # as given (local: the address of the cluster started)
    workers: int  # tasks in flight at once
    threads: int  # threads and CPUs per task
    nodes: int
    cpus: float
    started_here: bool

    def as_dict(self) -> dict:
        return {"backend": "ray", "address": self.address, "nodes": self.nodes,
                "cpus": self.cpus, "workers": self.workers, "threads_per_worker": self.threads}

    def describe(self) -> str:
        return (f"Ray cluster {self.address}: {self.nodes} node(s), {self.cpus:g} CPUs; "
                f"{self.workers} worker(s) x {self.threads} thread(s)")

    def close(self) -> None:
        import ray

        ray.shutdown()  # a local cluster stops with it; a joined one is only left

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _host_port(address: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT or ray://HOST[:PORT]; ConfigError if it is neither."""
    client = address.startswith("ray://")
    rest = address[len("ray://"):] if client else address
    host, sep, port = rest.rpartition(":")
    if not sep:
        host, port = rest, str(DEFAULT_CLIENT_PORT if client else DEFAULT_GCS_PORT)
    if not host or not port.isdigit():
        raise ConfigError(f"--ray_address {address!r} is not '{LOCAL}', auto, HOST:PORT or "
                          "ray://HOST:PORT")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: Optional[float] = None) -> None:
    """Fail in seconds, naming the address, when no Ray cluster answers there (ray.init waits
    20-40 s, or longer, before giving up): a TCP connection first, then, for a GCS address
    (HOST:PORT), one request to the GCS, given `timeout` seconds too (a proxy or another
    service may accept any connection)."""
    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = (f"no answer within {timeout:g} s" if isinstance(exc, socket.timeout)
                  else (exc.strerror or str(exc)))
        raise ConfigError(f"Ray cluster {address} is not reachable ({host}:{port}: {reason}); "
                          "start it with `ray start --head` on that node, or use --ray_address "
                          "local") from None
    if not address.startswith("ray://"):
        _probe_gcs(address, f"{host}:{port}", timeout)


def _probe_gcs(address: str, gcs: str, timeout: float) -> None:
    try:
        from ray._raylet import GcsClient  # not public API: without it, ray.init decides
    except ImportError:
        return
    outcome: dict = {}

    def probe() -> None:
        try:
            GcsClient(address=gcs, cluster_id=None)
        except Exception as exc:  # noqa: BLE001 - RpcError and friends: not a Ray GCS
            outcome["error"] = exc

    thread = threading.Thread(target=probe, daemon=True, name="yoloquant-ray-probe")
    thread.start()
    thread.join(timeout)
    if thread.is_alive() or "error" in outcome:
        why = (f"no answer within {timeout:g} s" if thread.is_alive()
               else _first_line(outcome["error"]))
        raise ConfigError(f"Ray cluster {address} is not reachable: something listens at "
                          f"{gcs} but it is not a Ray head node ({why}); give the address "
                          "`ray start --head` printed, or use --ray_address local")


def check_flags(address: Optional[str], workers: Optional[int], threads: int) -> None:
    """Flag values, checked before any heavy work (and before Ray is imported)."""
    if address is None:
        if workers is not None:
            raise ConfigError("--ray_workers applies with --ray_address")
        return
    if workers is not None and workers < 1:
        raise ConfigError(f"--ray_workers must be at least 1, got {workers}")
    if threads < 1:
        raise ConfigError(f"--ray_threads must be at least 1, got {threads}")
    if address not in (LOCAL, "auto"):
        _host_port(address)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray_address needs Ray, which is not installed: pip install {RAY_PIN} "
                          "(it is in requirements.txt)") from None
    return ray


def connect(address: str, workers: Optional[int] = None, threads: int = 1) -> Cluster:
    """Start (`local`) or join (any other address) a Ray cluster."""
    check_flags(address, workers, threads)
    ray = _import_ray()
    if address not in (LOCAL, "auto"):
        check_reachable(address)  # before ray.init, which retries for minutes
    quiet = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report from our runs
    start = time.perf_counter()
    try:
        if address == LOCAL:
            workers = workers or max(1, (os.cpu_count() or 1) // threads)
            ray.init(num_cpus=workers * threads, **quiet)
        else:
            ray.init(address=address, **{k: v for k, v in quiet.items() if k != "include_dashboard"})
    except YoloQuantError:
        raise
    except Exception as exc:  # ConnectionError, RuntimeError, Ray's own: all mean "no cluster"
        raise ConfigError(f"cannot connect to the Ray cluster {address}: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = float(ray.cluster_resources().get("CPU", 0))
    if cpus < threads:
        ray.shutdown()
        raise ConfigError(f"the Ray cluster {address} has {cpus:g} CPUs, fewer than --ray_threads "
                          f"{threads}")
    workers = workers or max(1, int(cpus // threads))
    where = ray.get_runtime_context().gcs_address if address == LOCAL else address
    cluster = Cluster(address=where if address == LOCAL else address, workers=workers,
                      threads=threads, nodes=len(nodes), cpus=cpus,
                      started_here=address == LOCAL)
    log.info("%s (connected in %.1f s)", cluster.describe(), time.perf_counter() - start)
    return cluster


def put(value: Any):
    """`value` in Ray's object store (once; tasks given the reference read it from there)."""
    import ray

    return ray.put(value)


def run_tasks(cluster: Cluster, fn: Callable, items: Sequence, *shared,
              desc: str = "tasks", unit: str = "tasks", progress: bool = True,
              stop_after: Optional[int] = None) -> Iterator[tuple[int, Any]]:
    """(index, fn(item, *shared)) for every item, as the tasks finish (in any order).

    At most cluster.workers tasks run at once, each reserving cluster.threads CPUs; `shared`
    values (object references from `put`, or small values) are passed to every task.
    `stop_after`: submit only that many. A task whose worker died is retried TASK_RETRIES
    times; then the error is raised here, after everything finished before it was yielded."""
    import ray

    from ..progress import Progress

    remote = ray.remote(num_cpus=cluster.threads, max_retries=TASK_RETRIES)(fn)
    todo = list(enumerate(items))[:stop_after]
    pending: dict = {}
    with Progress(len(todo), desc, unit, enabled=progress) as bar:
        try:
            while todo or pending:
                while todo and len(pending) < cluster.workers:
                    i, item = todo.pop(0)
                    pending[remote.remote(item, *shared)] = i
                ready, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(ready[0])
                value = _result(ready[0], f"{desc}: task {i}")
                bar.update(1)
                yield i, value
        finally:
            for ref in pending:  # an error or interrupt: stop what is still queued
                ray.cancel(ref, force=True)


class TaskFailed(YoloQuantError):
    """A task failed on the cluster even after its retries."""


def _result(ref, what: str):
    """A finished task's value. Bad input met on a worker is the same error line as in one
    process, a bug the same traceback (Ray's, with the worker's); a worker or node that died is
    TaskFailed."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:  # the task itself raised
        if isinstance(exc.cause, YoloQuantError):
            raise exc.cause from None
        raise
    except ray.exceptions.RayError as exc:  # the worker died, the task was cancelled...
        raise TaskFailed(f"{what} failed on the Ray cluster ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    # Ray puts the worker's traceback first; the exception itself is the last line
    return lines[-1] if lines else type(exc).__name__


def run_on_actors(cluster: Cluster, cls: type, init_args: tuple, items: Sequence,
                  desc: str = "tasks", unit: str = "tasks",
                  progress: bool = True) -> Iterator[tuple[int, Any]]:
    """(index, cls(*init_args).run(item)) for every item, as they finish: one `cls` instance
    (a Ray actor, e.g. holding an inference session) per worker, each given the next item when
    it is done with one."""
    import ray

    from ..progress import Progress

    actor_cls = ray.remote(num_cpus=cluster.threads)(cls)
    actors = [actor_cls.remote(*init_args) for _ in range(min(cluster.workers, len(items)))]
    idle, pending = list(actors), {}
    todo = list(enumerate(items))
    with Progress(len(todo), desc, unit, enabled=progress) as bar:
        try:
            while todo or pending:
                while todo and idle:
                    actor = idle.pop()
                    i, item = todo.pop(0)
                    pending[actor.run.remote(item)] = (i, actor)
                ready, _ = ray.wait(list(pending), num_returns=1)
                i, actor = pending.pop(ready[0])
                value = _result(ready[0], f"{desc}: task {i}")
                idle.append(actor)
                bar.update(1)
                yield i, value
        finally:
            for actor in actors:
                ray.kill(actor)
