"""Telling the user something they must know, as a library may.

A few messages are neither warnings nor chatter: where an offline run's file went
and the command that uploads it, the server that ``init()`` started. Logged at INFO,
a script that never configured logging (most) would never show them: Python's
last-resort handler prints warnings and worse only. So they go to logging when the
application has configured it, and to stderr, one line, when it has not.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["notice"]


def notice(logger: logging.Logger, message: str, *args: object) -> None:
    """Say ``message % args``: through ``logger`` at INFO if logging is configured
    (a handler on it or an ancestor), else on stderr."""
    if logger.hasHandlers():
        logger.info(message, *args)
    else:
        print(message % args if args else message, file=sys.stderr, flush=True)
