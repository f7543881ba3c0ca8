"""Prefect's failure logs without the traceback when the error is the user's to fix."""

from __future__ import annotations

import logging

from tasks.errors import FitflowError


class UserErrorWithoutTraceback(logging.Filter):
    """Drop the traceback from a log record whose exception is a FitflowError.

    Its message already says what is wrong and how to fix it; a page of engine frames above it
    only hides that line.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], FitflowError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_user_error_tracebacks() -> None:
    """Install the filter on Prefect's run loggers (after prefect configured its logging)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, UserErrorWithoutTraceback) for f in logger.filters):
            logger.addFilter(UserErrorWithoutTraceback())
