"""Server settings: one pydantic-settings object, filled from keyword arguments, then `EMBER_*` variables.

Every `ember serve` option maps to a field here; the CLI passes only the options given on the command
line, so an unset option falls back to its environment variable and then to the default below.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_PUBLIC_ROUTES = ("/health", "/live", "/metrics")


def _split_list(value: object) -> object:
    """Accept a list, or a comma-separated string as environment variables carry it."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class ServerSettings(BaseSettings):
    """Everything `ember serve` can be told: model, engine sizes, network, limits, auth, shutdown."""

    model_config = SettingsConfigDict(env_prefix="EMBER_", extra="ignore", protected_namespaces=())

    # What to serve.
    model: str | None = Field(None, description="checkpoint directory; None serves the bundled default model")
    served_model_name: str | None = Field(None, description="name clients pass as `model`; default: the directory name")
    dtype: str | None = None
    device: str | None = None
    seed: int = 0
    cpu_threads: int | None = Field(None, gt=0, description="torch's intra-op CPU threads; default: one fewer "
                                    "than the usable cores (OMP_NUM_THREADS, if set, is kept)")

    # Engine sizes.
    max_model_len: int | None = Field(None, gt=0)
    max_num_seqs: int = Field(64, gt=0)
    max_num_batched_tokens: int = Field(2048, gt=0)
    kv_cache_tokens: int | None = Field(None, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    enable_prefix_caching: bool = True

    # Network and process.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"
    drain_timeout: float = Field(30.0, ge=0, description="seconds SIGTERM waits for in-flight requests")

    # Auth: an empty list turns it off.
    api_key: Annotated[list[str], NoDecode] = Field(default_factory=list)
    public_routes: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(DEFAULT_PUBLIC_ROUTES))

    # Limits, all on by default.
    max_queue: int = Field(256, ge=0, description="requests allowed to wait beyond max_num_seqs before 429")
    retry_after: int = Field(1, ge=0, description="seconds sent in Retry-After with 429 and 503")
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0)
    max_prompt_tokens: int | None = Field(None, gt=0, description="default: the context length")
    max_tokens_cap: int = Field(4096, gt=0, description="largest max_tokens a request may ask for")
    max_n: int = Field(16, gt=0)
    max_prompts: int = Field(32, gt=0, description="prompts in one completions request")
    max_logprobs: int = Field(20, ge=0, le=20)
    max_stop: int = Field(16, ge=0, description="stop strings plus stop token ids in one request")
    max_stop_chars: int = Field(256, gt=0, description="length of one stop string")

    # Adapters (LoRA / DoRA): loaded at start-up with `lora` or at run time through the API.
    enable_lora: bool = False
    lora_root: str | None = Field(None, description="adapters load only from under this directory")
    lora: Annotated[list[str], NoDecode] = Field(default_factory=list, description="NAME=PATH loaded at start-up")
    max_loras: int = Field(8, gt=0, description="distinct adapters one batch can mix (device slots)")
    max_lora_rank: int = Field(16, gt=0)
    max_cpu_loras: int | None = Field(None, gt=0, description="adapters loaded at once; default: no limit")

    @field_validator("api_key", "public_routes", "lora", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.lower()
        if level not in ("critical", "error", "warning", "info", "debug"):
            raise ValueError(f"log_level must be one of critical, error, warning, info, debug; got {value!r}")
        return level

    @model_validator(mode="after")
    def _keys(self) -> "ServerSettings":
        if any(not key for key in self.api_key):
            raise ValueError("api_key entries must not be empty")
        if self.enable_lora and not self.lora_root:
            raise ValueError("enable_lora needs lora_root: the directory adapters may be loaded from")
        if self.lora and not self.enable_lora:
            raise ValueError("lora (adapters to load at start-up) needs enable_lora")
        return self
