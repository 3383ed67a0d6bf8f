"""Progress bars for long stages: a thread-pooled map with a rich bar (quiet when asked)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
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
    """Iterate with a progress bar."""
    if not show:
        yield from items
        return
    with make_progress() as bar:
        task = bar.add_task(description, total=total if total is not None else len(items))  # type: ignore[arg-type]
        for item in items:
            yield item
            bar.advance(task)


def progress_map(
    fn: Callable[[T], R], items: Sequence[T], *, description: str = "", show: bool = True, workers: int | None = None
) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool (decoders and hashes release the GIL), in order, with a bar."""
    workers = workers or min(32, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from track(pool.map(fn, items), total=len(items), description=description, show=show)
