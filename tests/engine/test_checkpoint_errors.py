"""Bad checkpoints get one clear error naming the file and the problem."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint import load_model, save_model
from engine.config import ModelConfig
from engine.errors import CheckpointError
from engine.model import Transformer


@pytest.fixture()
def ckpt(tmp_path):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = Transformer(cfg)
    model.init_weights(0)
    save_model(model, cfg, tmp_path / "m")
    return tmp_path / "m", model


def test_round_trip(ckpt):
    path, model = ckpt
    loaded, _ = load_model(path)
    ids = torch.randint(0, 64, (1, 9))
    assert torch.equal(loaded(ids), model(ids))


def test_missing_tensor(ckpt):
    path, _ = ckpt
    sd = load_file(path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing tensor.*layers\.1\.mlp\.up_proj"):
        load_model(path)


def test_wrong_shape(ckpt):
    path, _ = ckpt
    sd = load_file(path / "model.safetensors")
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    save_file(sd, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*k_proj\.weight.*\(8, 32\).*\(16, 32\)"):
        load_model(path)


def test_unknown_model_type(ckpt):
    path, _ = ckpt
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json.*unknown model_type 'gpt2'"):
        load_model(path)


def test_pickle_only(ckpt):
    path, _ = ckpt
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*never unpickles.*safetensors"):
        load_model(path)


def test_corrupt_safetensors(ckpt):
    path, _ = ckpt
    (path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*not a readable safetensors"):
        load_model(path)


def test_missing_dir_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_model(tmp_path / "empty")


def test_sharded_save_and_load(tmp_path):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128)
    model = Transformer(cfg)
    model.init_weights(1)
    save_model(model, cfg, tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    loaded, _ = load_model(tmp_path)
    ids = torch.randint(0, 64, (2, 5))
    assert torch.equal(loaded(ids), model(ids))


def test_bf16_weights_load_as_bf16(ckpt, tmp_path):
    path, model = ckpt
    loaded, _ = load_model(path, dtype="bfloat16")
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    save_model(loaded, loaded.config, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again, _ = load_model(tmp_path / "bf16")
    assert again.lm_head.weight.dtype == torch.bfloat16
