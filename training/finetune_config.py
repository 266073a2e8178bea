"""Settings of a fine-tuning run (SFT or DPO; full, LoRA, DoRA or QLoRA), loaded from YAML with overrides.

The YAML mirrors `FinetuneConfig`: top-level keys (`base`, `method`, `out_dir`, `seed`, `epochs`) and the
sections `data`, `lora`, `qlora`, `dpo`, `eval`, plus the pretraining loop's `optim`, `schedule`,
`train`, `checkpoint` and `log` sections (training/config.py). Unknown keys are errors. Defaults are
those of common LoRA recipes (peft / LLaMA-Factory): lr 2e-4, no weight decay, short warm-up.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from engine.lora import DEFAULT_TARGETS, LoraConfig
from training.config import (CheckpointSection, ConfigError, OptimSection, ScheduleSection, TrainSection, _build,
                             parse_value)
from training.sft_data import FORMATS

METHODS = ("lora", "dora", "qlora", "full")
ADAPTER_METHODS = ("lora", "dora", "qlora")
DPO_LOSSES = ("sigmoid",)


@dataclass
class FtDataSection:
    """Training (and validation) data.

    format: auto | alpaca | chat | sharegpt | text (instruction formats; `text` = plain-text causal LM).
    range: the fraction of a text file's characters to train on, e.g. [0.0, 0.9].
    val_path / val_range: held-out data; val_fraction instead holds out the last rows of `path`.
    """

    path: str = ""
    format: str = "auto"
    range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    val_path: str | None = None
    val_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    val_fraction: float = 0.0
    seq_len: int = 1024
    micro_batch_size: int = 4
    packing: bool = False
    max_examples: int | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"data.format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        for name in ("range", "val_range"):
            lo, hi = (float(x) for x in getattr(self, name))
            if not 0.0 <= lo < hi <= 1.0:
                raise ConfigError(f"data.{name} must be [start, end] with 0 <= start < end <= 1, got [{lo}, {hi}]")
            setattr(self, name, [lo, hi])
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.seq_len < 8 or self.micro_batch_size < 1:
            raise ConfigError("data.seq_len must be >= 8 and data.micro_batch_size >= 1")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"data.max_examples must be positive or null, got {self.max_examples}")


@dataclass
class LoraSection:
    """Adapter shape; `method` decides LoRA vs DoRA (and QLoRA's quantized base)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    use_rslora: bool = False

    def __post_init__(self) -> None:
        try:
            self.to_lora_config(use_dora=False)
        except ValueError as exc:
            raise ConfigError(f"lora: {exc}") from exc

    def to_lora_config(self, use_dora: bool) -> LoraConfig:
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, use_rslora=self.use_rslora, use_dora=use_dora)


@dataclass
class QloraSection:
    """How QLoRA freezes the base: 4-bit blocks (nf4 or fp4), double quantization, compute dtype."""

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    blocksize: int = 64

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"qlora.quant_type must be nf4 or fp4, got {self.quant_type!r}")
        if self.compute_dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError(f"qlora.compute_dtype must be bfloat16, float16 or float32, got {self.compute_dtype!r}")


@dataclass
class DpoSection:
    """Direct Preference Optimization: beta (strength of the KL anchor) and label smoothing (cDPO)."""

    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be positive, got {self.beta}")
        if self.loss not in DPO_LOSSES:
            raise ConfigError(f"dpo.loss must be one of {', '.join(DPO_LOSSES)}, got {self.loss!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


@dataclass
class FtEvalSection:
    """Validation loss every `every` steps (0: only before and after training) over at most `batches`."""

    every: int = 0
    batches: int | None = None  # None: the whole validation set

    def __post_init__(self) -> None:
        if self.every < 0 or (self.batches is not None and self.batches < 1):
            raise ConfigError("eval.every must be >= 0 and eval.batches positive or null")


@dataclass
class FtLogSection:
    every: int = 10
    progress: bool = True
    tensorboard: bool = False

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"log.every must be positive, got {self.every}")


SECTIONS: dict[str, type] = {
    "data": FtDataSection, "lora": LoraSection, "qlora": QloraSection, "dpo": DpoSection,
    "optim": OptimSection, "schedule": ScheduleSection, "train": TrainSection, "eval": FtEvalSection,
    "checkpoint": CheckpointSection, "log": FtLogSection,
}
# Fine-tuning defaults that differ from pretraining's.
DEFAULTS: dict[str, dict[str, Any]] = {
    "optim": {"lr": 2e-4, "weight_decay": 0.0, "betas": [0.9, 0.999]},
    "schedule": {"warmup_steps": 10, "decay": "cosine", "min_lr_ratio": 0.1},
    "train": {"max_steps": 200},
    "checkpoint": {"every": 0, "keep_last": 2, "export_dtype": "bfloat16"},
}


@dataclass
class FinetuneConfig:
    """A whole fine-tuning run. `epochs`, when set, replaces train.max_steps by that many passes."""

    base: str = ""
    method: str = "lora"
    out_dir: str = "runs/finetune"
    seed: int = 0
    epochs: float | None = None
    data: FtDataSection = field(default_factory=FtDataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    qlora: QloraSection = field(default_factory=QloraSection)
    dpo: DpoSection = field(default_factory=DpoSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(**DEFAULTS["optim"]))
    schedule: ScheduleSection = field(default_factory=lambda: ScheduleSection(**DEFAULTS["schedule"]))
    train: TrainSection = field(default_factory=lambda: TrainSection(**DEFAULTS["train"]))
    eval: FtEvalSection = field(default_factory=FtEvalSection)
    checkpoint: CheckpointSection = field(default_factory=lambda: CheckpointSection(**DEFAULTS["checkpoint"]))
    log: FtLogSection = field(default_factory=FtLogSection)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"epochs must be positive or null, got {self.epochs}")

    @property
    def uses_adapter(self) -> bool:
        return self.method in ADAPTER_METHODS

    def lora_config(self) -> LoraConfig:
        return self.lora.to_lora_config(use_dora=self.method == "dora")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "FinetuneConfig":
        """Build from nested plain data; errors name `source` and the key."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
        top = {f.name for f in dataclasses.fields(cls)} - set(SECTIONS)
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key in SECTIONS:
                merged = {**DEFAULTS.get(key, {}), **(value or {})}
                kwargs[key] = _build(SECTIONS[key], merged, f"{source}: {key}")
            elif key in top:
                kwargs[key] = value
            else:
                raise ConfigError(f"{source}: unknown top-level key {key!r} (known: {', '.join(sorted(top | set(SECTIONS)))})")
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("base", "method", "out_dir", "seed", "epochs")}
        for key in SECTIONS:
            section = dataclasses.asdict(getattr(self, key))
            out[key] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
        return out


def load_finetune_config(path: str | Path | None, overrides: Iterable[str] = (),
                         **fields: Any) -> FinetuneConfig:
    """Read a YAML config (or start empty), set `fields` given on the command line, apply key=value overrides.

    fields use dotted keys too ({"data.path": ..., "method": ...}); None values are left out.
    """
    raw: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        source = str(path)
    for key, value in fields.items():
        if value is not None:
            _set_dotted(raw, key, value)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set_dotted(raw, key.strip(), parse_value(text))
    return FinetuneConfig.from_dict(raw, source=source)


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is not a section")
        node = child
    node[leaf] = value


def save_finetune_config(config: FinetuneConfig, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
