"""Tasks by name. A task is a `TaskSpec` (what to load, how to prompt, what to measure) plus a loader;
adding one is a `register(TaskSpec(...))` call and touches nothing else."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from training.eval.errors import EvalError

KINDS = ("multiple_choice", "generation", "perplexity")
REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_ENV = "EMBER_DATA_DIR"


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task.

    `load(path)` returns zero-shot items (ChoiceItem / GenerationItem; unused for perplexity).
    `fewshot_pool(path)` returns the examples few-shot prompts draw from (None: the evaluated items
    themselves, never an item as its own example). `default_data` is relative to the data root.
    Generation tasks set `max_tokens`, `stop` and `score(items, outputs) -> (metrics, samples)`.
    """

    name: str
    kind: str
    summary: str
    data_format: str
    default_data: str | None = None
    load: Callable[[Path], list] | None = None
    fewshot_pool: Callable[[Path], list | None] | None = None
    fewshot_sampler: str = "random"
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    score: Callable[[Sequence[Any], Sequence[str]], tuple[list, list]] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind != "perplexity" and self.load is None:
            raise ValueError(f"task {self.name}: a {self.kind} task needs a loader")
        if self.kind == "generation" and self.score is None:
            raise ValueError(f"task {self.name}: a generation task needs a score function")


_TASKS: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    if spec.name in _TASKS:
        raise ValueError(f"task {spec.name!r} is already registered")
    _TASKS[spec.name] = spec
    return spec


def _builtins() -> None:
    import training.eval.tasks  # noqa: F401  (registers the built-in tasks)


def get_task(name: str) -> TaskSpec:
    _builtins()
    if name not in _TASKS:
        raise EvalError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def task_names() -> list[str]:
    _builtins()
    return sorted(_TASKS)


def data_root() -> Path | None:
    """$EMBER_DATA_DIR, else a `shared/data` folder beside the working directory or the source checkout."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    for base in (Path.cwd(), REPO_ROOT):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def resolve_data(spec: TaskSpec, data: str | os.PathLike | None) -> Path:
    """The path to evaluate on: the one given, else the task's default under the data root."""
    if data is not None:
        return Path(data)
    if spec.default_data is None:
        raise EvalError(f"task {spec.name} has no default data: pass --data PATH ({spec.data_format})")
    root = data_root()
    path = root / spec.default_data if root is not None else None
    if path is None or not path.exists():
        raise EvalError(f"task {spec.name}: default data {spec.default_data} not found under "
                        f"{root or '(no data root)'}; pass --data PATH ({spec.data_format}) or set {DATA_ENV}")
    return path
