"""A failed stage in a run's log: its one-line cause first, its traceback once.

Left alone, Prefect logs a failing exception's traceback at every level it passes: the stage's
task, the stage's subflow, the parent flow and the engine's exit, so `prefect deployment run
--watch` shows the same traceback twice and the cause sits under it. Here the stage logs the cause
as one line (`stage NAME failed: Type: message`), the flow the user watches logs it again with
the traceback under it, and the engine's later reports of that same exception keep their one line
but drop the repeated traceback (a filter on Prefect's run loggers).
"""

from __future__ import annotations

import logging

_REPORTED = "_jurassiclass_reported"  # set on an exception whose traceback a flow has logged, or will
_KEEP = "jurassiclass_traceback"  # log-record flag: this record is the one that carries the traceback


def cause(exc: BaseException) -> str:
    """`Type: message`, the line users read first."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def log_failure(log, stage: str, exc: BaseException, *, traceback: bool) -> None:
    """Log `stage NAME failed: Type: message`, with the traceback under it when ``traceback``;
    either way the engine's own later reports of ``exc`` lose their copy of the traceback."""
    log.error("stage %s failed: %s", stage, cause(exc), exc_info=exc if traceback else None, extra={_KEEP: traceback})
    try:
        setattr(exc, _REPORTED, True)
    except (AttributeError, TypeError):  # exceptions with __slots__: they keep Prefect's default logging
        pass


class _TracebackOnce(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and getattr(exc, _REPORTED, False) and not getattr(record, _KEEP, False):
            record.exc_info, record.exc_text = None, None
        return True


def install() -> None:
    """Add the filter to Prefect's flow-run and task-run loggers (idempotent)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _TracebackOnce) for f in logger.filters):
            logger.addFilter(_TracebackOnce())


install()
