"""Trial executors. Each yields ``(prepared trial, record)`` pairs as trials finish; the driver in
``driver.run_many`` is the only record writer. A worker that dies mid-trial yields a
failed record for the trial it held, so nothing is lost or duplicated, and ``--resume``
re-runs exactly the failed and missing trials.
"""
from __future__ import annotations

import ctypes
import gc
import multiprocessing as mp
import os
import time
from contextlib import contextmanager
from multiprocessing.connection import wait
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .pipeline import Prepared, Resources, failure_record, prepare, run_trial


def release_heap() -> None:
    """After a trial: collect reference cycles and return the allocator's free pages to the system (glibc's
    ``malloc_trim``; nothing where there is none), so a long suite's resident memory does not creep from trial to
    trial (issue 18: ~6 MB per LAMP trial without it, under 1 MB with it)."""
    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def local_executor(specs: Sequence[Prepared], *, device: torch.device, out_dir, resources: Resources, workers=None,
                   address=None) -> Iterator[tuple[Prepared, dict]]:
    for p in specs:
        record = run_trial(p, device=device, out_dir=out_dir, resources=resources)
        release_heap()
        yield p, record


#: the thread-count variables of the math libraries a worker loads (OpenMP, OpenBLAS, MKL, numexpr)
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


@contextmanager
def thread_env(threads: int):
    """Set the thread-count variables while a worker process starts (it inherits the environment),
    so that n workers use n * threads cores rather than n * all of them; restored afterwards."""
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update({k: str(threads) for k in THREAD_VARS})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _worker_main(conn, device: str, out_dir: str, threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    resources = Resources()
    while True:
        msg = conn.recv()
        if msg is None:
            return
        index, spec = msg  # a TrialSpec: the worker resolves its attack once, here
        record = run_trial(prepare(spec), device=device, out_dir=out_dir, resources=resources)
        release_heap()
        conn.send((index, record))


def process_executor(specs: Sequence[Prepared], *, device: torch.device, out_dir, resources: Resources, workers=None,
                     address=None) -> Iterator[tuple[Prepared, dict]]:
    """A local pool of worker processes, one trial at a time each; dead workers are replaced."""
    n = max(1, min(workers or (os.cpu_count() or 1), len(specs) or 1))
    threads = max(1, (os.cpu_count() or 1) // n)
    ctx = mp.get_context("spawn")
    queue = list(enumerate(specs))[::-1]
    live: dict = {}  # conn -> [process, (index, start) | None]

    def spawn():
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker_main, args=(child, str(device), str(out_dir), threads), daemon=True)
        with thread_env(threads):  # numpy/scipy's BLAS reads these at import, before _worker_main runs
            p.start()
        child.close()
        live[parent] = [p, None]

    def feed(conn):
        if queue:
            index, p = queue.pop()
            conn.send((index, p.spec))
            live[conn][1] = (index, time.perf_counter())
        else:
            conn.send(None)
            live[conn][0].join(timeout=10)
            del live[conn]

    for _ in range(n):
        spawn()
    for conn in list(live):
        feed(conn)
    while live:
        sentinels = {live[c][0].sentinel: c for c in live}
        ready = wait(list(live) + list(sentinels))
        for obj in ready:
            conn = obj if obj in live else sentinels.get(obj)
            if conn is None or conn not in live:
                continue
            proc, held = live[conn]
            if obj is conn:
                try:
                    index, record = conn.recv()
                except (EOFError, OSError):
                    obj = proc.sentinel  # died while sending: treat as a crash below
                else:
                    yield specs[index], record
                    live[conn][1] = None
                    feed(conn)
                    continue
            # the worker process ended
            proc.join(timeout=5)
            del live[conn]
            if held is not None:
                index, start = held
                yield specs[index], failure_record(
                    specs[index], device=device, wall_s=time.perf_counter() - start,
                    error=f"WorkerCrashed: worker process {proc.pid} died (exit code {proc.exitcode}) during the trial")
            if queue:
                spawn()
                feed(next(c for c in live if live[c][1] is None))


def _ray_trial(spec, device: str, out_dir: str) -> dict:
    return run_trial(prepare(spec), device=device, out_dir=out_dir)


def ray_executor(specs: Sequence[Prepared], *, device: torch.device, out_dir, resources: Resources, workers=None,
                 address=None) -> Iterator[tuple[Prepared, dict]]:
    """One Ray task per trial (``max_retries=0``: a killed task is a failed record, not a silent rerun)."""
    try:
        import ray
    except ImportError:
        from .errors import UserError

        raise UserError("--executor ray needs the ray package: pip install ray==2.60.0") from None
    started_here = False
    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": workers or os.cpu_count(),
                                                       "include_dashboard": False}
        ray.init(log_to_driver=False, configure_logging=False, **kwargs)
        started_here = not address
    try:
        task = ray.remote(_ray_trial).options(num_cpus=1, num_gpus=1 if device.type == "cuda" else 0,
                                              max_retries=0, retry_exceptions=False)
        pending = {}
        for p in specs:
            pending[task.remote(p.spec, str(device), str(Path(out_dir).resolve()))] = (p, time.perf_counter())
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                p, start = pending.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - worker crash / task killed -> failed record
                    record = failure_record(p, device=device, wall_s=time.perf_counter() - start,
                                            error=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
                yield p, record
    finally:
        if started_here:
            ray.shutdown()


EXECUTORS = {"local": local_executor, "process": process_executor, "ray": ray_executor}
