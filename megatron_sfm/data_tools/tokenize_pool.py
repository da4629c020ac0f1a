"""Forked tokenize workers that hand their tokens back in shared memory, in input order.

``sfm data tokenize --workers N`` used to run a ``multiprocessing.Pool`` whose results
(numpy token arrays) were pickled through pipes: every token was copied four more times
(pickle, pipe write, pipe read, unpickle) and the parent spent about a third of a core on
it, so two workers gave 1.4x one worker's rate. Here each worker owns
:data:`SLOTS_PER_WORKER` slots of anonymous shared memory (``mmap``, created before the
fork), encodes a chunk straight into a slot, and sends only the chunk's metadata (a few
numbers and the per-document lengths) through its pipe; the parent writes the slot to the
``.bin`` and hands the slot back with the next chunk. A chunk whose tokens do not fit a
slot (a very long line, an unusual tokenizer) comes back through the pipe instead.

Order: chunks are numbered as they are handed out and yielded in that order; a worker
holds at most :data:`SLOTS_PER_WORKER` chunks, so a slow chunk stalls the others only
after they have filled their slots.

Failure: a worker that raises sends its exception (raised again in the parent); a worker
that dies (killed, out of memory) closes its pipe, and the parent raises a one-line
``SfmError``. Tasks go out through one sender thread per worker, so the parent never
blocks on a busy worker's pipe while another worker waits to be read.
"""

from __future__ import annotations

import mmap
import os
import pickle
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from megatron_sfm.errors import SfmError

SLOTS_PER_WORKER = 3


class SlotPool:
    """``workers`` forked processes running ``work(task, out) -> (result, nbytes)``.

    ``work`` writes a task's output into ``out`` (a uint8 array of ``slot_bytes`` in
    shared memory) when it fits and returns ``(result, nbytes)`` with ``nbytes`` the bytes
    written there, or ``(result, None)`` when the output travels inside ``result``.
    :meth:`imap` yields ``(task, result, data)`` in task order, ``data`` a uint8 view of
    the slot valid until the next item is asked for (or ``None``). ``warm_up``, if given,
    runs in each worker right after the fork (while the parent goes on).
    """

    def __init__(self, workers: int, slot_bytes: int, work: Callable[[Any, np.ndarray], tuple[Any, int | None]],
                 warm_up: Callable[[], None] | None = None):
        import multiprocessing as mp

        self._maps = [[mmap.mmap(-1, max(1, slot_bytes)) for _ in range(SLOTS_PER_WORKER)] for _ in range(workers)]
        self._views = [[np.frombuffer(m, np.uint8) for m in maps] for maps in self._maps]
        ctx = mp.get_context("fork")
        self._procs, self._conns, self._queues, self._senders = [], [], [], []
        for w in range(workers):  # every fork before any thread of ours exists
            parent_end, child_end = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=_worker_main, args=(child_end, self._views[w], work, warm_up,
                                                          list(self._conns)), daemon=True, name=f"sfm-tokenize-{w}")
            proc.start()
            child_end.close()
            self._procs.append(proc)
            self._conns.append(parent_end)
        for conn in self._conns:
            tasks: queue.SimpleQueue = queue.SimpleQueue()
            sender = threading.Thread(target=_send_all, args=(conn, tasks), daemon=True)
            sender.start()
            self._queues.append(tasks)
            self._senders.append(sender)

    def imap(self, tasks: Iterable) -> Iterator[tuple[Any, Any, np.ndarray | None]]:
        from multiprocessing.connection import wait

        tasks = iter(tasks)
        handed: dict[int, Any] = {}  # seq -> task, until yielded
        done: dict[int, tuple[int, int, Any, int | None]] = {}  # seq -> (worker, slot, result, nbytes)
        state = {"next": 0, "exhausted": False}

        def hand_out(w: int, slot: int) -> None:
            if state["exhausted"]:
                return
            task = next(tasks, None)
            if task is None:
                state["exhausted"] = True
                return
            seq = state["next"]
            state["next"] += 1
            handed[seq] = task
            self._queues[w].put((seq, slot, task))

        for slot in range(SLOTS_PER_WORKER):
            for w in range(len(self._procs)):
                hand_out(w, slot)
        by_conn = {id(c): w for w, c in enumerate(self._conns)}
        want = 0
        while want < state["next"]:
            while want not in done:
                for conn in wait(self._conns):
                    w = by_conn[id(conn)]
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):
                        self._procs[w].join(timeout=1)
                        raise SfmError(f"tokenize worker {w} died (exit code {self._procs[w].exitcode}); "
                                       "out of memory? rerun with fewer --workers or a smaller --chunk-mb") from None
                    if msg[0] == "fail":
                        raise msg[2]
                    _, seq, slot, result, nbytes = msg
                    done[seq] = (w, slot, result, nbytes)
            w, slot, result, nbytes = done.pop(want)
            data = self._views[w][slot][:nbytes] if nbytes is not None else None
            yield handed.pop(want), result, data
            want += 1
            hand_out(w, slot)

    def close(self) -> None:
        """Stop the workers after their queued tasks (normal end)."""
        for q in self._queues:
            q.put(None)
        for t in self._senders:
            t.join()
        for p in self._procs:
            p.join()
        self._release()

    def terminate(self) -> None:
        """Kill the workers at once (an error or interrupt in the parent)."""
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for q in self._queues:
            q.put(None)
        for p in self._procs:
            p.join()
        self._release()

    def _release(self) -> None:
        for c in self._conns:
            c.close()
        # the shared memory is unmapped when the last view of it (maybe still held by
        # the caller) is gone
        self._views, self._maps = [], []


def _send_all(conn, tasks: queue.SimpleQueue) -> None:
    while True:
        task = tasks.get()
        try:
            conn.send(task)
        except OSError:  # the worker is gone; the parent finds out from the result pipe
            return
        if task is None:
            return


def _worker_main(conn, views: list[np.ndarray], work, warm_up, others: list) -> None:
    for other in others:  # the parent's ends of the earlier workers' pipes, inherited by the fork
        other.close()
    seq = -1
    try:
        if warm_up is not None:
            warm_up()
        while True:
            task = conn.recv()
            if task is None:
                break
            seq, slot, payload = task
            result, nbytes = work(payload, views[slot])
            conn.send(("ok", seq, slot, result, nbytes))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the parent
        try:
            pickle.dumps(exc)
        except Exception:
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        try:
            conn.send(("fail", seq, exc))
        except OSError:
            pass
    finally:
        conn.close()
        os._exit(0)
