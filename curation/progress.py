"""Progress bars for long stages: a thread-pooled map with a rich bar (quiet when asked)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
R = TypeVar("R")


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )


def track(items: Iterable[T], *, total: int | None = None, description: str = "", show: bool = True) -> Iterator[T]:
    """Iterate with a progress bar (and report to the current `listening` observer, if any)."""
    listener = _listener.get()
    if listener is not None:
        items = _observed(items, listener, description, total if total is not None else len(items))  # type: ignore[arg-type]
    if not show:
        yield from items
        return
    with make_progress() as bar:
        task = bar.add_task(description, total=total if total is not None else len(items))  # type: ignore[arg-type]
        for item in items:
            yield item
            bar.advance(task)


# An observer of long loops in this context (the orchestration layer turns it into progress
# artifacts), called with (description, done, total) at most every `_NOTIFY_S` and at the end.
Listener = Callable[[str, int, int], None]
_listener: ContextVar[Listener | None] = ContextVar("progress_listener", default=None)
_NOTIFY_S = 2.0


@contextmanager
def listening(fn: Listener) -> Iterator[None]:
    """Report every `track`/`progress_map` loop run inside this block to ``fn``."""
    token = _listener.set(fn)
    try:
        yield
    finally:
        _listener.reset(token)


def _observed(items: Iterable[T], fn: Listener, description: str, total: int) -> Iterator[T]:
    done, last = 0, time.monotonic()
    fn(description, 0, total)
    for item in items:
        yield item
        done += 1
        if time.monotonic() - last >= _NOTIFY_S:
            last = time.monotonic()
            fn(description, done, total)
    fn(description, done, total)


def progress_map(
    fn: Callable[[T], R], items: Sequence[T], *, description: str = "", show: bool = True, workers: int | None = None
) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool (decoders and hashes release the GIL), in order, with a bar."""
    workers = workers or min(32, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from track(pool.map(fn, items), total=len(items), description=description, show=show)
