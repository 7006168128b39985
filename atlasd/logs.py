"""How atlasd's log lines look: the text format people read, and the JSON format log
shippers parse (``--log-format``, ``ATLAS_LOG_FORMAT``), and the per-line fields (the key a
line concerns) both carry.

JSON is one object per line, shaped like logrus's JSONFormatter and klog's JSON format
(fixed fields, then the line's own), e.g. (one line)::

    {"time":"2026-12-05T01:20:33.123Z","level":"warning","logger":"atlasd.reconcile.loop",
     "message":"reconcile east: ...; retrying","key":"east"}

- ``time`` is RFC 3339 in UTC (milliseconds), ``level`` the lowercase Python level name
  (debug, info, warning, error, critical), ``logger`` the logger's dotted name, ``message``
  the line's text exactly as the text format shows it;
- the fields of the line: what the call passed as ``extra=`` (``log.warning(...,
  extra={"key": name})``) and what the task logging it is bound to (``bound(key=...)``; a
  work queue binds the key a worker took, ``atlasd.watch.workqueue``), each a field of its
  own. A field that would shadow one of the four is written as ``fields.<name>`` (logrus);
- an exception (``log.exception``, ``exc_info=``) is the field ``exception``: its type,
  message and traceback in one string (so the line stays one line); ``stack_info`` is
  ``stack``.

No secret reaches a line through this module: a field's value is written with ``str()``
except ``bytes`` (PEM, a Secret's data), written as ``<N bytes>``, never decoded, and a field
whose name says it holds a credential (``token``, ``password``, ``private_key`` ...) is
written as ``<redacted>``. Tracebacks hold no local variables; what exception messages hold
is kept clean where they are made (``atlasd.kube.errors`` redacts a Secret's API response,
``model.CertKey`` has no private key in its repr).

The text format is the one atlasd always had, ``TIME LEVEL LOGGER: MESSAGE``; its lines
name their key in the message, as before, and carry no field suffix.

The standard library's ``logging`` with one small Formatter, rather than structlog or
python-json-logger: every module already logs through ``logging``, the format is a few
lines, and a dependency would add nothing a shipper needs.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import types
from collections.abc import Iterator, Mapping
from typing import Final, Literal

LogFormat = Literal["text", "json"]
LOG_FORMATS: Final = ("text", "json")

# The text format (``atlasd.cli.options.configure_logging`` installs it at start).
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Fields bound to the current task (trio gives each task its own copy of the context, so a
# binding made by one worker is never seen by another). Never mutated: each binding makes a
# new mapping.
_BOUND: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "atlasd_log_fields", default=types.MappingProxyType({})
)

# A LogRecord's own attributes: anything else on a record came from ``extra=``.
_RECORD_ATTRS: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_CORE: Final = ("time", "level", "logger", "message")
# Field names that say they hold a credential (compared lowercase, ``-`` as ``_``).
_SECRET_NAMES: Final = frozenset(
    {
        "token",
        "password",
        "passwd",
        "secret",
        "private_key",
        "key_pem",
        "authorization",
        "credentials",
        "client_key_data",
    }
)
REDACTED: Final = "<redacted>"


def bind(**fields: object) -> None:
    """Bind ``fields`` to the current task's later lines (None unbinds a field)."""
    merged = {**_BOUND.get(), **fields}
    _BOUND.set({k: v for k, v in merged.items() if v is not None})


def bound_fields() -> Mapping[str, object]:
    """The fields bound to the current task."""
    return _BOUND.get()


@contextlib.contextmanager
def bound(**fields: object) -> Iterator[None]:
    """Lines logged inside the block (by this task and tasks it starts) carry ``fields``."""
    token = _BOUND.set({**_BOUND.get(), **fields})
    try:
        yield
    finally:
        _BOUND.reset(token)


def _value(name: str, value: object) -> object:
    if name.lower().replace("-", "_") in _SECRET_NAMES:
        return REDACTED
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _timestamp(created: float) -> str:
    t = dt.datetime.fromtimestamp(created, dt.UTC)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        # The task's bound fields first, then the call's own (more specific) ``extra``.
        fields = dict(_BOUND.get())
        fields.update((k, v) for k, v in record.__dict__.items() if k not in _RECORD_ATTRS)
        for name, value in fields.items():
            doc[f"fields.{name}" if name in _CORE else name] = _value(name, value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def formatter(fmt: LogFormat) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)


def use_format(fmt: LogFormat) -> None:
    """Switch the root logger's handlers to ``fmt``, keeping the level (the level is the
    root group's option, the format a daemon command's)."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter(fmt))
