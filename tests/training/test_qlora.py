"""QLoRA on the CPU: NF4 + double-quantized frozen base, bf16 compute, only the adapters train."""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from engine.adapter_io import load_adapter, save_adapter  # noqa: E402
from engine.checkpoint import load_model  # noqa: E402
from engine.lora import LoraConfig, inject_adapters, lora_modules, mark_only_adapters_trainable, merge_adapters  # noqa: E402
from finetune_fixtures import tiny_base, write_alpaca  # noqa: E402
from training.finetune_config import QloraSection, load_finetune_config  # noqa: E402
from training.qlora import quantize_base  # noqa: E402
from training.sft import run_sft  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base"))


def _ids(seed=0):
    return torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(seed))


def _qlora(base, compute="bfloat16", use_dora=False):
    model, _ = load_model(base, dtype="float32")
    quantize_base(model, QloraSection(compute_dtype=compute))
    inject_adapters(model, LoraConfig(r=8, lora_alpha=16, use_dora=use_dora))
    mark_only_adapters_trainable(model)
    return model


def test_base_is_nf4_double_quantized(base):
    model = _qlora(base)
    quantized = [(p, m) for p, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * len(LINEARS)  # every projection of both layers; the head stays dense
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    for _, m in quantized:
        state = m.weight.quant_state
        assert m.weight.dtype == torch.uint8 and state.quant_type == "nf4" and state.nested  # double quant
        assert m.compute_dtype == torch.bfloat16 and not m.weight.requires_grad
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_forward_backward_trains_only_adapters(base):
    model = _qlora(base)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids()
    losses = []
    for _ in range(4):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None}
        assert grads and all(".lora_" in n for n in grads)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"{name} changed"


def test_quantized_base_stays_close_to_full_precision(base):
    full, _ = load_model(base, dtype="float32")
    model = _qlora(base, compute="float32")
    ids = _ids(1)
    with torch.no_grad():
        want, got = full(ids), model(ids)
    # NF4 is lossy; the logits move but stay strongly correlated with the fp32 model's.
    corr = torch.corrcoef(torch.stack([want.flatten(), got.flatten()]))[0, 1]
    assert corr > 0.95


def test_dora_on_nf4_starts_as_base_and_merges_exactly(base, tmp_path):
    model = _qlora(base, compute="float32", use_dora=True)
    ids = _ids(2)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.enabled = False
        plain = model(ids)
        for _, m in lora_modules(model):
            m.enabled = True
        assert torch.allclose(model(ids), plain, atol=1e-4)  # m = ||dequantized W||, B = 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        adapted = model(ids)
    save_adapter(model, LoraConfig(r=8, lora_alpha=16, use_dora=True), tmp_path / "adapter")
    with torch.no_grad():
        merge_adapters(model)  # dequantize + fold: dense layers with the same outputs
        assert not any(isinstance(m, bnb.nn.Linear4bit) for p, m in model.named_modules() if p != "")
        assert (model(ids) - adapted).abs().max().item() < 1e-3
    dense, _ = load_model(base, dtype="float32")
    load_adapter(dense, tmp_path / "adapter")  # a QLoRA adapter is an ordinary PEFT adapter


def test_qlora_sft_run(base, tmp_path):
    data = write_alpaca(tmp_path / "a.json", repeat=2)
    cfg = load_finetune_config(None, ["train.max_steps=10", "data.seq_len=64", "data.micro_batch_size=6",
                                      "log.progress=false", "optim.lr=5e-3", "schedule.warmup_steps=1",
                                      "qlora.compute_dtype=float32"],
                               base=str(base), method="qlora", out_dir=str(tmp_path / "out"),
                               **{"data.path": str(data), "data.val_path": str(data)})
    summary = run_sft(cfg)
    assert summary["val_end"]["loss"] < summary["val_start"]["loss"] - 0.3
    assert summary["trainable_params"] < summary["total_params"] / 2
