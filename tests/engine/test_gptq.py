"""GPTQ: lower layer-output error than round-to-nearest, same storage format, checkpoint round trip."""
from __future__ import annotations

import json

import pytest
import torch

from engine.gptq import gptq_quantize, input_hessians
from engine.kernels.quant_matmul import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8


def _correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    """Activations with uneven, correlated features (what makes GPTQ's error feedback pay)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * torch.logspace(0, -1.5, k)[None, :]
    return torch.randn(n, k, generator=g) @ mix.T + 0.1 * torch.randn(n, k, generator=g)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, None)])
def test_gptq_lowers_the_output_error_of_round_to_nearest(bits, group):
    torch.manual_seed(bits)
    x = _correlated_inputs(2048, 256, seed=1)
    w = torch.randn(48, 256)
    h = x.T @ x / x.shape[0]
    q, s = gptq_quantize(w, h, bits, group, torch.float32)
    if bits == 4:
        assert q.dtype == torch.uint8 and q.shape == (48, 128) and s.shape == (48, 256 // group)
        w_gptq, w_rtn = dequantize_int4(q, s), dequantize_int4(*quantize_int4(w, group))
    else:
        assert q.dtype == torch.int8 and q.abs().max() <= 127 and s.shape == (48,)
        w_gptq, w_rtn = dequantize_int8(q, s), dequantize_int8(*quantize_int8(w))
    err_gptq = (x @ (w - w_gptq).T).pow(2).mean()
    err_rtn = (x @ (w - w_rtn).T).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_dead_inputs_get_zero_weights_and_no_nans():
    x = _correlated_inputs(512, 128, seed=2)
    x[:, 5] = 0.0  # an input that never fires
    h = x.T @ x / x.shape[0]
    q, s = gptq_quantize(torch.randn(16, 128), h, 4, 32, torch.float32)
    deq = dequantize_int4(q, s)
    assert torch.isfinite(deq).all() and (deq[:, 5] == 0).all()


def test_input_hessians_match_the_inputs_seen():
    lin = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    batches = [torch.randn(5, 8), torch.randn(7, 8)]
    hs = input_hessians(lin, ["0", "2"], batches)
    x = torch.cat(batches)
    torch.testing.assert_close(hs["0"], x.T @ x / 12)
    mid = torch.relu(lin[0](x))
    torch.testing.assert_close(hs["2"], mid.T @ mid / 12, rtol=1e-5, atol=1e-6)
    assert not lin[0]._forward_hooks  # hooks removed


def test_gptq_checkpoint_loads_and_tracks_the_float_model_better(tmp_path):
    from engine.checkpoint import load_model
    from engine.quant import QuantLinear, quantize_checkpoint
    from training.tiny import make_tiny_checkpoint

    src = make_tiny_checkpoint(tmp_path / "fp", seed=3, hidden_size=64, num_layers=2)
    text = tmp_path / "calib.txt"
    text.write_text("Once upon a time there was a little fox who liked to run in the woods. " * 60)
    rtn = quantize_checkpoint(src, tmp_path / "rtn", 4, 32)
    gptq = quantize_checkpoint(src, tmp_path / "gptq", 4, 32, calibration_text=text, calibration_samples=16,
                               calibration_seq_len=64)
    cfg = json.loads((gptq / "config.json").read_text())["quantization_config"]
    assert cfg["algorithm"] == "gptq" and cfg["bits"] == 4 and cfg["group_size"] == 32
    ref, _ = load_model(src, dtype=torch.float32)
    m_rtn, _ = load_model(rtn, dtype=torch.float32)
    m_gptq, _ = load_model(gptq, dtype=torch.float32)
    assert any(isinstance(m, QuantLinear) for m in m_gptq.modules())
    from engine.quant import calibration_batches

    ids = torch.cat(calibration_batches(src, text, 8, 64, seed=7))
    with torch.no_grad():
        want = ref(ids)
        err_rtn = (m_rtn(ids) - want).pow(2).mean()
        err_gptq = (m_gptq(ids) - want).pow(2).mean()
    assert err_gptq < err_rtn


def test_calibration_text_errors(tmp_path):
    from engine.quant import calibration_batches
    from training.tiny import make_tiny_checkpoint

    src = make_tiny_checkpoint(tmp_path / "fp", seed=4, hidden_size=64, num_layers=1)
    with pytest.raises(ValueError, match="not found"):
        calibration_batches(src, tmp_path / "missing.txt", 4, 32)
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(ValueError, match="at least 33 are needed"):
        calibration_batches(src, short, 4, 32)
