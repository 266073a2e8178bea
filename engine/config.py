"""Configuration dataclasses: the model's shape (Hugging Face `config.json`) and the engine's settings.

ModelConfig reads both the older keys most published checkpoints carry (`rope_theta`, `rope_scaling`)
and the `rope_parameters` dict that transformers 5 writes; it always writes both so either reader works.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

# model_type -> architectures entry written to config.json
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3")

_SWITCH_OFF = ("0", "false", "no", "off")
_SWITCH_ON = ("1", "true", "yes", "on")


def env_switch(name: str) -> bool | None:
    """An on/off environment variable: True for 1/true/yes/on, False for 0/false/no/off (any case),
    None when it is unset or says something else (the caller's default then applies; a value that is
    neither is logged, so a typo does not pass silently)."""
    value = os.environ.get(name, "").strip().lower()
    if value in _SWITCH_ON:
        return True
    if value in _SWITCH_OFF:
        return False
    if value:
        _warn_unknown_switch(name, value)
    return None


@functools.lru_cache(maxsize=None)
def _warn_unknown_switch(name: str, value: str) -> None:
    """Log an unrecognised switch value once (some switches are read on every kernel launch)."""
    logging.getLogger(__name__).warning("%s=%r is not one of %s or %s: ignored", name, value,
                                        "/".join(_SWITCH_ON), "/".join(_SWITCH_OFF))


@dataclass
class ModelConfig:
    """The decoder's shape; field names follow Hugging Face's Llama config."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # QKV bias (Qwen2); o_proj never has one
    mlp_bias: bool = False
    hidden_act: str = "silu"
    num_local_experts: int = 0  # >0: Mixtral-style mixture-of-experts feed-forward
    num_experts_per_tok: int = 2
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise ValueError(
                f"unknown model_type {self.model_type!r}; Ember loads {', '.join(sorted(ARCHITECTURES))}"
            )
        if self.model_type == "qwen2":
            self.attention_bias = True  # Qwen2 always has q/k/v biases; its config has no key for it
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; Ember's feed-forward is SwiGLU (silu)")
        if self.num_local_experts and not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError("num_experts_per_tok must be between 1 and num_local_experts")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
            if rope_type == "default":
                self.rope_scaling = None

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def num_parameters(self) -> int:
        """Parameter count (embeddings included; the head counted once when tied)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.attention_bias else 0)
        ffn = 3 * d * f * max(1, self.num_local_experts) + (d * self.num_local_experts)
        per_layer = attn + ffn + 2 * d
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_hidden_layers * per_layer + d + head

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Build from a parsed `config.json`, ignoring keys Ember does not use."""
        if "model_type" not in raw:
            raise ValueError("config.json has no 'model_type'")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        if "dtype" in raw and "torch_dtype" not in raw:
            kwargs["torch_dtype"] = raw["dtype"]
        params = raw.get("rope_parameters")
        if isinstance(params, dict):  # transformers 5 layout: theta and scaling in one dict
            params = dict(params)
            if "rope_theta" in params:
                kwargs["rope_theta"] = params.pop("rope_theta")
            rope_type = params.get("rope_type", params.get("type", "default"))
            kwargs["rope_scaling"] = None if rope_type == "default" else params
        if raw.get("model_type") == "mixtral":
            kwargs.setdefault("num_local_experts", raw.get("num_local_experts", 8))
        if kwargs.get("torch_dtype") is None:
            kwargs["torch_dtype"] = "float32"
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` contents, readable by transformers 4.x and 5.x."""
        out: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **(self.rope_scaling or {})},
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.torch_dtype,
            "initializer_range": self.initializer_range,
        }
        if self.model_type in ("llama", "mistral", "mixtral"):
            out["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        if self.model_type in ("mistral", "mixtral", "qwen2"):
            out["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            out["use_sliding_window"] = False
        if self.model_type == "mixtral":
            out["num_local_experts"] = self.num_local_experts
            out["num_experts_per_tok"] = self.num_experts_per_tok
        return out


@dataclass
class EngineConfig:
    """Settings of one serving engine. Sizes are in tokens unless named otherwise."""

    model: str = ""
    dtype: str | None = None  # None: the checkpoint's dtype (bf16 on GPU if it is fp32 there)
    device: str | None = None  # None: cuda when available, else cpu
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16
    kv_cache_tokens: int | None = None  # CPU (or forced) KV pool size in tokens
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ValueError(f"kv_cache_tokens must be at least one block ({self.block_size}), got {self.kv_cache_tokens}")
