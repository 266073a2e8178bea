"""Evaluation: perplexity, multiple-choice benchmarks by log-likelihood, and generation metrics.

A task (`registry.TaskSpec` + a loader) turns a data file into items; a backend scores them, in
process (`LocalModel`: a checkpoint, optionally with an adapter) or through any OpenAI-compatible
server that echoes prompt logprobs (`ServerModel`). `evaluate(task, backend, EvalOptions(...))`
returns an `EvalReport`. Heavy modules (torch, httpx) load only with the backend that needs them.
"""
from __future__ import annotations

from training.eval.errors import DataError, EvalError, ServerError
from training.eval.registry import TaskSpec, get_task, register, task_names
from training.eval.report import EvalReport, MetricValue, format_table, write_json, write_samples
from training.eval.runner import EvalOptions, evaluate

__all__ = ["DataError", "EvalError", "EvalOptions", "EvalReport", "MetricValue", "ServerError", "TaskSpec",
           "evaluate", "format_table", "get_task", "register", "task_names", "write_json", "write_samples"]
