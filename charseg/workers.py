"""Worker pools (processes or threads) with one Ctrl-C policy, for every stage that runs work in parallel.

    with WorkerPool(4, processes=True, initializer=setup) as pool:
        futures = [pool.submit(work, item) for item in items]
        for future in pool.as_completed(futures):
            use(future.result())

The policy:

* The first Ctrl-C (SIGINT) cancels the work not started yet and stops the work running: worker processes
  are terminated (SIGTERM, then SIGKILL after GRACE_SECONDS), threads finish the one item they hold. The
  KeyboardInterrupt then unwinds the stage as usual, so its temporary output is removed (charseg.io)
  and run_cli exits with 130, within about a second instead of after all the queued work.
* A second Ctrl-C while that happens kills the workers at once (SIGKILL) and raises KeyboardInterrupt
  right where the main thread is.
* Workers never see Ctrl-C themselves (the terminal sends it to the whole process group): they ignore
  SIGINT and are stopped by their parent only, so no worker prints a traceback or starts the next item.
  SIGINT is blocked in the parent's thread that spawns a worker, so that the child inherits the blocked
  mask through its start-up (imports) until it ignores the signal.
* No worker outlives its parent: each worker process checks every PARENT_CHECK_SECONDS that its parent is
  still there and exits otherwise (the parent killed by SIGKILL or the OOM killer runs no cleanup).
* Any other exception inside the `with` block (an OSError from a worker, a full disk...) stops the pool
  the same way, without waiting for the queued work, and propagates unchanged.
* A worker process that dies by itself (e.g. the OOM killer) becomes a CharsegError naming the likely
  cause instead of concurrent.futures' BrokenProcessPool traceback.

The main thread waits for futures only through `as_completed` / `map`, which poll: a Ctrl-C during a
wait or a submit is recorded by the pool's handler and raised right after it, never inside
concurrent.futures' locks or while a worker is being spawned (a KeyboardInterrupt there can leave a
future's lock held and hang the interpreter's exit, or orphan a half-started worker). Elsewhere Ctrl-C
raises KeyboardInterrupt immediately, as in any Python code. The handler is
installed only when the pool is entered from the main thread (signals cannot be handled elsewhere);
from another thread the pool works the same minus the Ctrl-C handling.
"""
from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator

from charseg.errors import CharsegError

GRACE_SECONDS = 1.0          # terminated workers get this long to exit before SIGKILL
POLL_SECONDS = 0.1           # how often a waiting main thread looks for a recorded Ctrl-C
PARENT_CHECK_SECONDS = 0.25  # how often a worker process checks that its parent is alive


def cpu_count() -> int:
    """CPUs this process may use (a container's or taskset's limit, not the host's core count): what a
    `workers: 0` setting means."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(PARENT_CHECK_SECONDS)
        if os.getppid() != parent_pid:  # reparented: the parent is gone
            os._exit(1)


def _start_worker(parent_pid: int, initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    """Runs first in every worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the parent while spawning
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class WorkerPool:
    """A ProcessPoolExecutor (spawn context) or ThreadPoolExecutor that follows the policy above."""

    def __init__(self, workers: int, *, processes: bool = True,
                 initializer: Callable[..., Any] | None = None, initargs: tuple = ()) -> None:
        self.workers = max(1, int(workers))
        self.processes = processes
        self._initializer, self._initargs = initializer, initargs
        self._executor: Executor | None = None
        self._interrupts = 0       # Ctrl-Cs seen while the pool is open
        self._inside = False       # the main thread is inside concurrent.futures (a submit or a wait)
        self._stopping = False
        self._previous_handler: Any = None
        self._handler_installed = False
        self._processes: dict[int, multiprocessing.Process] = {}  # every worker started (the executor forgets)

    # -- lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> WorkerPool:
        if self.processes:
            # spawn, not fork: forking a process that has run OpenCV/ffmpeg/torch threads can deadlock the
            # children. The multiprocessing queues are created here, so their helper process (the resource
            # tracker) starts now too; it ignores SIGINT by itself.
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                initargs=(os.getpid(), self._initializer, self._initargs))
        else:
            self._executor = ThreadPoolExecutor(self.workers, initializer=self._initializer,
                                                initargs=self._initargs)
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
            self._handler_installed = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None and not self._interrupts:
                try:
                    self._executor.shutdown(wait=True)  # all work is done: the workers just exit
                except BaseException:
                    self.stop()
                    raise
            else:
                self.stop()
        finally:
            if self._handler_installed:
                signal.signal(signal.SIGINT, self._previous_handler)
                self._handler_installed = False
        if exc_type is None and self._interrupts:
            raise KeyboardInterrupt  # a Ctrl-C recorded after the last wait must not be lost

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._interrupts += 1
        if self._interrupts > 1 or self._stopping:
            self._kill_now()  # a second Ctrl-C, or one while the pool is already stopping: no more grace
        if self._inside:
            return  # raised by _internals() as soon as the main thread is out of concurrent.futures
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def _internals(self) -> Iterator[None]:
        """Where a Ctrl-C is recorded, not raised: concurrent.futures' locks and process spawning."""
        if self._interrupts:
            raise KeyboardInterrupt
        self._inside = True
        try:
            yield
        finally:
            self._inside = False
        if self._interrupts:
            raise KeyboardInterrupt

    def _worker_processes(self) -> list[multiprocessing.Process]:
        self._processes.update(getattr(self._executor, "_processes", None) or {})
        return list(self._processes.values())

    def _kill_now(self) -> None:
        for process in self._worker_processes():
            with contextlib.suppress(Exception):
                process.kill()

    def stop(self) -> None:
        """Cancel the queued work and stop the running work now (see the module docstring)."""
        self._stopping = True
        executor = self._executor
        processes = self._worker_processes()  # shutdown() forgets them
        manager = getattr(executor, "_executor_manager_thread", None)
        executor.shutdown(wait=False, cancel_futures=True)
        if not processes:
            return  # threads: each finishes the one item it holds, the queued ones are cancelled
        for process in processes:
            with contextlib.suppress(Exception):
                process.terminate()
        deadline = time.monotonic() + GRACE_SECONDS
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                with contextlib.suppress(Exception):
                    process.kill()
                process.join(GRACE_SECONDS)
        if manager is not None:
            manager.join(GRACE_SECONDS)  # it notices the dead workers and fails the remaining futures

    # -- work --------------------------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        # A worker process may be spawned here: it inherits the blocked SIGINT (see the module docstring).
        with self._internals(), (_sigint_blocked() if self.processes else contextlib.nullcontext()):
            future = self._executor.submit(fn, *args, **kwargs)
        if self.processes:
            self._worker_processes()  # remember the ones just started
        return future

    def _wait(self, futures: set[Future]) -> set[Future]:
        """The futures of `futures` that are done, waiting for at least one; KeyboardInterrupt on Ctrl-C."""
        while True:
            with self._internals():
                done, _ = wait(futures, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            if done:
                return done

    def _check(self, future: Future) -> Future:
        error = None if future.cancelled() else future.exception()
        if isinstance(error, BrokenProcessPool):
            deadline = time.monotonic() + 0.5
            for process in self._worker_processes():
                # The executor's own thread may be reaping it at the same moment: ask until it is known.
                while process.exitcode is None and time.monotonic() < deadline:
                    process.join(0.02)
            # -SIGTERM: the others, which the executor terminates once one has died.
            codes = sorted({p.exitcode for p in self._worker_processes()
                            if p.exitcode not in (None, 0, -signal.SIGTERM)})
            raise CharsegError(
                f"a worker process ended abruptly (exit code {', '.join(map(str, codes)) or 'unknown'}; -9 is "
                f"SIGKILL, usually the system running out of memory): use fewer workers, or free memory") from None
        return future

    def as_completed(self, futures: Iterable[Future]) -> Iterator[Future]:
        """The futures as they finish (like concurrent.futures.as_completed), interruptible by Ctrl-C."""
        pending = set(futures)
        while pending:
            done = self._wait(pending)
            pending -= done
            for future in done:
                yield self._check(future)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], window: int | None = None) -> Iterator[Any]:
        """fn(item) for each item, in order, with at most `window` items in flight (memory stays flat)."""
        iterator = iter(items)
        queue = [self.submit(fn, item) for item in itertools.islice(iterator, window or 2 * self.workers)]
        while queue:
            head = queue.pop(0)
            if not head.done():
                self._wait({head})
            yield self._check(head).result()
            queue.extend(self.submit(fn, item) for item in itertools.islice(iterator, 1))
