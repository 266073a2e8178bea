"""A checkpoint with a sliding window: the engine caps its context at the window it cannot emulate."""
import pytest

from engine.config import EngineConfig, ModelConfig
from engine.engine import Engine
from engine.errors import ContextLengthError
from engine.model import Transformer
from engine.sampling import SamplingParams


def test_context_capped_at_sliding_window():
    cfg = ModelConfig(model_type="mistral", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, sliding_window=48)
    model = Transformer(cfg)
    model.init_weights(0)
    engine = Engine(EngineConfig(device="cpu", kv_cache_tokens=512), model=model, tokenizer=None)
    assert engine.max_model_len == 48
    with pytest.raises(ContextLengthError, match="48"):
        engine.add_request("r", list(range(1, 50)), SamplingParams(max_tokens=4, temperature=0))
