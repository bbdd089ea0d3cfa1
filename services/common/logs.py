"""Structured JSON log lines on stderr. Fields passed with ``extra=`` become JSON keys; keys that
look like secrets are masked, so a careless ``extra={"password": ...}`` cannot leak one."""

from __future__ import annotations

import json
import logging
import sys
import time

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "color_message"}
_SECRET_WORDS = ("password", "secret", "token", "api_key", "authorization")


def _redact(key: str, value: object) -> object:
    if any(w in key.lower() for w in _SECRET_WORDS):
        return "***"
    return value


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = _redact(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # third-party chatter stays at WARNING unless asked for
    for noisy in ("aiokafka", "kafka", "faust", "mode", "uvicorn.access", "httpx", "mail.log"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def logging_dict_config(service: str, level: str = "INFO") -> dict[str, object]:
    """The same JSON lines, as a dictConfig (for runners that configure logging themselves: faust/mode)."""
    quiet = {name: {"level": "WARNING"} for name in ("aiokafka", "kafka", "faust", "mode", "httpx")}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "services.common.logs.JsonFormatter", "service": service}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": quiet,
    }
