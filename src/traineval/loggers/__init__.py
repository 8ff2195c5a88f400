"""Where run events go: metrics.jsonl always; TensorBoard, W&B and MLflow arrive as extras."""

from .jsonl import JsonlLogger, read_jsonl

__all__ = ["JsonlLogger", "read_jsonl"]
