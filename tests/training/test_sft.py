"""End-to-end supervised fine-tuning on a tiny checkpoint: losses fall, outputs load, resume is exact."""
import json
import shutil

import pytest
import torch

from ember_cli.main import main as ember
from engine.adapter_io import load_adapter
from engine.checkpoint import load_model
from finetune_fixtures import tiny_base, write_alpaca, write_chat_jsonl
from training.checkpointing import list_checkpoints
from training.finetune_config import ConfigError, load_finetune_config
from training.sft import run_sft

FAST = ["train.max_steps=15", "data.seq_len=64", "data.micro_batch_size=8", "log.progress=false",
        "log.every=5", "optim.lr=5e-3", "schedule.warmup_steps=2", "lora.r=8", "lora.dropout=0.0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_alpaca(tmp_path_factory.mktemp("data") / "alpaca.json")


def _cfg(base, data, out, *overrides, method="lora"):
    return load_finetune_config(None, [*FAST, *overrides], base=str(base), method=method, out_dir=str(out),
                                **{"data.path": str(data), "data.val_path": str(data)})


@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_sft_loss_falls_and_output_loads(base, data, tmp_path, method):
    summary = run_sft(_cfg(base, data, tmp_path / "out", method=method))
    start, end = summary["val_start"]["loss"], summary["val_end"]["loss"]
    assert end < start - 0.5, (start, end)
    model, _ = load_model(base, dtype="float32")
    if method == "full":
        model, _ = load_model(tmp_path / "out", dtype="float32")
        assert summary["trainable_params"] == summary["total_params"]
    else:
        adapter = load_adapter(model, tmp_path / "out")
        assert adapter.config.use_dora == (method == "dora")
        assert summary["trainable_params"] < summary["total_params"] / 2
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [5, 10, 15]


def test_resume_continues_exactly(base, data, tmp_path):
    """A run stopped after a checkpoint and resumed ends with the same adapter as an uninterrupted run."""
    extra = ["train.max_steps=8", "checkpoint.every=4", "lora.dropout=0.1"]
    full = run_sft(_cfg(base, data, tmp_path / "a", *extra))
    ckpts = list_checkpoints(tmp_path / "a" / "checkpoints")
    assert [c.name for c in ckpts] == ["step_000000004"]
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpts[0], tmp_path / "b" / "checkpoints" / ckpts[0].name)
    resumed = run_sft(_cfg(base, data, tmp_path / "b", *extra))
    assert resumed["final_train_loss"] == pytest.approx(full["final_train_loss"], rel=1e-6)
    a, b = load_model(base, dtype="float32")[0], load_model(base, dtype="float32")[0]
    load_adapter(a, tmp_path / "a")
    load_adapter(b, tmp_path / "b")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), name


def test_cli_finetune_chat_jsonl_with_packing(base, tmp_path):
    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    rc = ember(["finetune", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "out"),
                "--method", "lora", *FAST, "train.max_steps=3", "data.packing=true", "data.seq_len=256"])
    assert rc == 0
    summary = json.loads((tmp_path / "out" / "finetune_summary.json").read_text())
    assert summary["train_examples"] < 6  # six conversations packed into fewer sequences
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="lora: unknown key"):
        load_finetune_config(None, ["lora.rank=8"])
    with pytest.raises(ConfigError, match="method must be one of"):
        load_finetune_config(None, [], method="prefix")
    assert load_finetune_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  format: csv\n")
    with pytest.raises(ConfigError, match="data.format"):
        load_finetune_config(bad)


def test_cli_reports_missing_data(base, tmp_path, capsys):
    assert ember(["finetune", "--base", str(base), "--out", str(tmp_path)]) == 2
    assert "--data" in capsys.readouterr().err


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[2] / "configs" / "finetune").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = load_finetune_config(path)
        assert cfg.base and cfg.data.path, path
