"""Where run events go: metrics.jsonl always; TensorBoard on request. Every logger follows
the `Logger` protocol (`log(metrics, step)`, `log_config`, `close`), and `LoggerHub` keeps a
failing one from stopping training."""

from .base import Logger, LoggerHub, numbers
from .jsonl import JsonlLogger, read_jsonl

__all__ = ["JsonlLogger", "Logger", "LoggerHub", "numbers", "read_jsonl"]
