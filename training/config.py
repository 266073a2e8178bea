"""Settings of a training run: dataclasses validated on construction, loaded from YAML with overrides.

A YAML file mirrors `TrainConfig`: a few top-level keys (`name`, `seed`, `out_dir`) and one section per
dataclass below (`model`, `data`, `optim`, `schedule`, `train`, `parallel`, `eval`, `checkpoint`, `log`).
The `model` section holds Hugging Face `config.json` keys and becomes an `engine.config.ModelConfig`.
Unknown keys are errors, so a typo never silently falls back to a default.

Overrides use dotted keys with YAML values: `train.max_steps=200 optim.betas=[0.9,0.99] model.hidden_size=64`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from engine.config import ModelConfig

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DECAYS = ("cosine", "linear", "constant")
STRATEGIES = ("auto", "none", "ddp", "fsdp")


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the key and what to change."""


def _number(name: str, value: Any) -> float:
    # YAML 1.1 reads `1e-3` (no dot) as a string; accept it as the number it plainly is.
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


def _positive(section: str, **values: float | int | None) -> None:
    for name, value in values.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{section}.{name} must be positive, got {value}")


@dataclass
class DataSection:
    """Where the packed token shards are and how they are cut into training windows."""

    train: str = ""  # folder written by `ember prepare-data` (or its train split)
    val: str | None = None  # None: the validation split of the same folder, when it has one
    tokenizer: str | None = None  # tokenizer folder copied into every checkpoint (and used for samples)
    seq_len: int = 2048
    micro_batch_size: int = 4  # sequences per forward/backward on one device

    def __post_init__(self) -> None:
        _positive("data", seq_len=self.seq_len, micro_batch_size=self.micro_batch_size)


@dataclass
class OptimSection:
    """AdamW settings. Weight decay applies only to matrices of linear layers (see training/optim.py)."""

    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    fused: bool | None = None  # None: fused kernels where the device has them (CUDA)

    def __post_init__(self) -> None:
        self.lr, self.weight_decay, self.eps = _number("optim.lr", self.lr), \
            _number("optim.weight_decay", self.weight_decay), _number("optim.eps", self.eps)
        self.betas = tuple(float(b) for b in self.betas)  # YAML gives a list
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        _positive("optim", lr=self.lr, eps=self.eps)
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class ScheduleSection:
    """Linear warm-up from 0 to the peak rate, then a decay to `min_lr_ratio` of it at the last step."""

    warmup_steps: int = 2000
    decay: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay not in DECAYS:
            raise ConfigError(f"schedule.decay must be one of {', '.join(DECAYS)}, got {self.decay!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainSection:
    """The optimisation loop: length, batch shape, numerics and the failure policy."""

    max_steps: int = 1000  # optimizer steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step on each device
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 | fp16
    gradient_checkpointing: bool = False
    dropout: float = 0.0  # residual and embedding dropout while training (see training/dropout.py)
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto | cpu | cuda
    deterministic: bool = False  # deterministic algorithms (bit-identical reruns on the CPU)
    max_bad_steps: int = 3  # stop after this many consecutive steps with a NaN/inf loss or gradient
    peak_tflops: float | None = None  # per device, for MFU; None: looked up from the device name

    def __post_init__(self) -> None:
        _positive("train", max_steps=self.max_steps, grad_accum_steps=self.grad_accum_steps,
                  max_bad_steps=self.max_bad_steps, peak_tflops=self.peak_tflops)
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ConfigError(f"train.max_grad_norm must be >= 0 or null, got {self.max_grad_norm}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"train.dropout must be in [0, 1), got {self.dropout}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"train.device must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class ParallelSection:
    """Data parallelism across the processes torchrun starts (one per device)."""

    strategy: str = "auto"  # auto (ddp when torchrun starts several processes) | none | ddp | fsdp

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"parallel.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")


@dataclass
class EvalSection:
    """Periodic validation loss / perplexity and sample generations."""

    every: int = 500  # steps; 0 switches periodic evaluation off (the final one still runs)
    batches: int = 20  # validation micro-batches per evaluation
    prompts: list[str] = field(default_factory=lambda: ["Once upon a time"])
    max_new_tokens: int = 64
    temperature: float = 0.8

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every must be >= 0, got {self.every}")
        _positive("eval", batches=self.batches)
        if self.max_new_tokens < 0 or self.temperature < 0:
            raise ConfigError("eval.max_new_tokens and eval.temperature must be >= 0")
        self.prompts = list(self.prompts or [])


@dataclass
class CheckpointSection:
    """Training-state checkpoints under `<out_dir>/checkpoints` and the final exported model."""

    every: int = 1000  # steps; 0: only at the end
    keep_last: int = 3
    export_dtype: str = "bfloat16"  # dtype of the final model in `<out_dir>/final`

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"checkpoint.every must be >= 0, got {self.every}")
        _positive("checkpoint", keep_last=self.keep_last)
        if self.export_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"checkpoint.export_dtype must be float32, bfloat16 or float16, got {self.export_dtype!r}")


@dataclass
class LogSection:
    """Console, JSON-lines and TensorBoard logging."""

    every: int = 10  # steps between log lines
    tensorboard: bool = True
    progress: bool = True  # tqdm progress bar on the main process

    def __post_init__(self) -> None:
        _positive("log", every=self.every)


SECTIONS: dict[str, type] = {
    "data": DataSection, "optim": OptimSection, "schedule": ScheduleSection, "train": TrainSection,
    "parallel": ParallelSection, "eval": EvalSection, "checkpoint": CheckpointSection, "log": LogSection,
}


@dataclass
class TrainConfig:
    """A whole pretraining run. `model` is the architecture; the sections say how to train it."""

    model: ModelConfig
    name: str = "run"
    seed: int = 0
    out_dir: str = "runs/run"
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ConfigError(f"data.seq_len ({self.data.seq_len}) exceeds model.max_position_embeddings "
                              f"({self.model.max_position_embeddings})")
        if self.schedule.warmup_steps > self.train.max_steps:
            raise ConfigError(f"schedule.warmup_steps ({self.schedule.warmup_steps}) exceeds train.max_steps "
                              f"({self.train.max_steps})")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from nested plain data as read from YAML; errors name `source` and the key."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
        raw = dict(raw)
        if "model" not in raw or not isinstance(raw["model"], dict):
            raise ConfigError(f"{source}: needs a 'model' section with Hugging Face config keys")
        model_raw = {"model_type": "llama", **raw.pop("model")}
        known_model = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(model_raw) - known_model)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) in model: {', '.join(unknown)}")
        try:
            kwargs: dict[str, Any] = {"model": ModelConfig(**model_raw)}
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: model: {exc}") from exc
        top = {f.name for f in dataclasses.fields(cls)} - {"model"} - set(SECTIONS)
        for key, value in raw.items():
            if key in SECTIONS:
                kwargs[key] = _build(SECTIONS[key], value or {}, f"{source}: {key}")
            elif key in top:
                kwargs[key] = value
            else:
                raise ConfigError(f"{source}: unknown top-level key {key!r} "
                                  f"(known: {', '.join(sorted(top | set(SECTIONS) | {'model'}))})")
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain nested data (YAML/JSON-safe); `from_dict(to_dict())` gives an equal config."""
        out: dict[str, Any] = {"name": self.name, "seed": self.seed, "out_dir": self.out_dir}
        out["model"] = dataclasses.asdict(self.model)
        for key in SECTIONS:
            section = dataclasses.asdict(getattr(self, key))
            out[key] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
        return out


def _build(cls: type, values: dict[str, Any], where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of `raw` with `a.b.c=value` overrides applied; values are parsed as YAML scalars/lists."""
    out = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        value = parse_value(text)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def parse_value(text: str) -> Any:
    """A YAML scalar or list; numbers YAML 1.1 leaves as strings (`1e-3`) become floats."""
    if not text.strip():
        return None
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read a YAML training config, apply dotted `key=value` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    return TrainConfig.from_dict(apply_overrides(raw, overrides), source=str(path))


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (what the run actually used)."""
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
