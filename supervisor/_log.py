"""Structured logging: one line per event, ``key=value`` fields after the message."""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from pathlib import Path

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        fields = " ".join(f"{k}={_fmt(v)}" for k, v in record.__dict__.items() if k not in _STD)
        line = f"{ts} {record.levelname.lower():7} {record.name.removeprefix('supervisor.')}: {record.getMessage()}"
        if fields:
            line += "  " + fields
        if record.exc_info and record.exc_info[1] is not None:
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                line += "\n" + self.formatException(record.exc_info)
            else:  # the operator gets what and where in one line; the traceback at --log-level debug
                exc = record.exc_info[1]
                tb = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
                where = f" at={Path(tb[0].filename).name}:{tb[0].lineno}" if tb else ""
                line += f"  error={_fmt(f'{type(exc).__name__}: {exc}')}{where}"
        return line


def _fmt(v: object) -> str:
    s = str(v)
    return repr(s) if (" " in s or not s) else s


def setup_logging(level: str | None) -> None:
    level = (level or os.environ.get("REFLOW_LOG") or "info").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level, logging.INFO))
    for noisy in ("trio-websocket", "trio_websocket"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
