"""Serving adapters in mixed batches: every request's logits equal its merged checkpoint's, LoRA and DoRA.

The reference is independent of the serving path: the adapter files are loaded with engine/adapter_io
into LoraLinear wrappers and merged into dense weights (the fine-tuning code path, itself checked
against `peft`), then run by the plain model with causal SDPA.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import weakref

import pytest
import torch

from engine.adapter_io import load_adapter
from engine.adapter_testing import write_random_adapter
from engine.adapters import AdapterNotFoundError, AdapterServingConfig
from engine.config import EngineConfig, ModelConfig
from engine.engine import Engine
from engine.errors import InvalidRequestError
from engine.fusion import fuse_model
from engine.lora import merge_adapters
from engine.model import Transformer
from engine.sampling import SamplingParams

TOL = 1e-4


@pytest.fixture(scope="module")
def base_model() -> Transformer:
    config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = Transformer(config)
    model.init_weights(seed=1)
    with torch.no_grad():  # peaked logits, so the adapters' effect is far above the tolerance
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory, base_model):
    root = tmp_path_factory.mktemp("adapters")
    write_random_adapter(base_model, root / "x", r=8, alpha=16, seed=1)
    write_random_adapter(base_model, root / "y", r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), seed=2)
    write_random_adapter(base_model, root / "d", r=6, alpha=12, use_dora=True, use_rslora=True, seed=3)
    write_random_adapter(base_model, root / "x2", r=8, alpha=16, seed=4)  # a retrained "x"
    return root


def merged(base_model: Transformer, adapter_dir, device: str = "cpu") -> Transformer:
    model = copy.deepcopy(base_model)
    load_adapter(model, adapter_dir)
    return merge_adapters(model).eval().to(device)


def make_engine(base_model, lora_root, max_loras=4, device="cpu", fused=False, **kw) -> Engine:
    config = EngineConfig(model="", device=device, max_model_len=256, kv_cache_tokens=4096, block_size=16, **kw)
    adapters = AdapterServingConfig(lora_root=str(lora_root), max_loras=max_loras, max_lora_rank=8)
    model = copy.deepcopy(base_model).to(device)
    if fused:  # what the runner does on CUDA: adapters then wrap the fused q/k/v and gate/up projections
        fuse_model(model)
    return Engine(config, model=model, tokenizer=None, adapters=adapters)


class Recorder:
    """Steps an engine and keeps every step's (plan, model output, LoraBatch) and every request's tokens."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.steps = []
        self.tokens: dict[str, list[int]] = {}
        engine.runner.execute = self._execute

    def _execute(self, plan):
        inp = self.engine.runner.prepare_inputs(plan)
        out = self.engine.runner.execute_model(inp)
        # Decode graphs write their logits into one shared buffer: keep this step's own copy.
        self.steps.append((plan, dataclasses.replace(out, logits=out.logits.clone()), inp.lora))
        return out

    def step(self) -> None:
        for out in self.engine.step():
            self.tokens.setdefault(out.request_id, list(out.prompt_token_ids))
            for choice in out.outputs:
                self.tokens[out.request_id].extend(choice.token_ids)

    def run(self) -> "Recorder":
        while self.engine.has_unfinished():
            self.step()
        return self


def check_logits(steps, tokens, references: dict, tol: float = TOL):
    """Every logits row the engine computed equals the reference model's at that position."""
    full = {rid: references[rid](torch.tensor([ids], device=next(references[rid].parameters()).device))[0]
            for rid, ids in tokens.items()}
    checked, bad = 0, []
    for i, (plan, out, _) in enumerate(steps):
        for seq in plan.seqs:
            rid = seq.request_id
            if rid in out.prompt_rows:
                row0, start, count = out.prompt_rows[rid]
                got, want = out.logits[row0:row0 + count], full[rid][start:start + count]
            else:
                row = out.sample_rows[rid]
                got, want = out.logits[row:row + 1], full[rid][seq.start_pos + len(seq.token_ids) - 1][None]
            err = (got - want).abs().max().item()
            if not err < tol:
                bad.append(f"step {i} ({len(seq.token_ids)} tokens) {rid}: {err:.2e}")
            checked += got.shape[0]
    assert not bad, "max |logit diff| above tolerance: " + "; ".join(bad)
    return checked


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (length + i,), generator=gen).tolist() for i in range(n)]


@pytest.mark.parametrize("device", ["cpu", "cpu-fused", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_mixed_batch_matches_merged_checkpoints(base_model, lora_root, kind, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fused, device = device.endswith("-fused"), device.removesuffix("-fused")
    engine = make_engine(base_model, lora_root, device=device, fused=fused)
    first = "x" if kind == "lora" else "d"
    engine.adapters.load(first, first)
    engine.adapters.load("y", "y")
    names = {"a": first, "b": "y", "c": None, "a2": first}
    base = copy.deepcopy(base_model).to(device)
    refs = {first: merged(base_model, lora_root / first, device), "y": merged(base_model, lora_root / "y", device),
            None: base}
    params = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=0, ignore_eos=True)
    for (rid, name), prompt in zip(names.items(), prompts(4, 11, seed=7)):
        engine.add_request(rid, prompt, params, lora=name)
    rec = Recorder(engine).run()
    steps, tokens = rec.steps, rec.tokens
    first_plan = steps[0][0]
    assert {s.adapter[0] if s.adapter else None for s in first_plan.seqs} == {first, "y", None}
    assert steps[0][2].has_dora == (kind == "dora")
    if fused:
        assert any(len(layer.slice_paths) == 3 for layer in engine.adapters.layers)
    with torch.no_grad():
        # On CUDA the engine runs the Triton kernels (fp32 dots in IEEE mode), the reference cuBLAS.
        checked = check_logits(steps, tokens, {rid: refs[name] for rid, name in names.items()},
                               TOL if device == "cpu" else 1e-3)
        assert checked > 4 * 11
        # The adapters matter: each one's logits are far from the base model's and from each other's.
        ids = torch.tensor([tokens["a"]], device=device)
        far = [(refs[first](ids) - base(ids)).abs().max(), (refs["y"](ids) - base(ids)).abs().max(),
               (refs[first](ids) - refs["y"](ids)).abs().max()]
    assert min(far) > 100 * TOL


@pytest.mark.parametrize("device", ["cpu-fused", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_separate_shrink_kernel_matches_merged_checkpoints(base_model, lora_root, kind, device, monkeypatch):
    """With the stacked shrink off, every step takes the path prefill steps over 512 tokens and quantized
    bases take (a separate shrink, on a side stream on CUDA): the same parity with the merged checkpoints."""
    monkeypatch.setenv("EMBER_LORA_STACKED", "0")
    test_mixed_batch_matches_merged_checkpoints(base_model, lora_root, kind, device)


def test_stacked_shrink_shares_the_base_weight(base_model, lora_root, monkeypatch):
    """The base weight is a view of the stacked matrix's first rows and the slots' A the rest, so loading an
    adapter writes its A where the GEMM reads it, and nothing is stored twice; EMBER_LORA_STACKED=0 keeps them apart."""
    engine = make_engine(base_model, lora_root)
    engine.adapters.load("x", "x")
    engine.add_request("a", prompts(1, 5, seed=3)[0], SamplingParams(max_tokens=1, ignore_eos=True), lora="x")
    engine.step()  # the step puts the adapter in a slot
    layers = engine.adapters.layers
    assert layers and all(layer.stacked is not None for layer in layers)
    for layer in layers:
        n = layer.out_features
        assert layer.base_layer.weight.data_ptr() == layer.stacked.data_ptr()
        assert layer.lora_a.data_ptr() == layer.stacked[n:].data_ptr()
        assert torch.equal(layer.stacked[n:].view_as(layer.lora_a), layer.lora_a)
    assert any(layer.lora_a.abs().sum() > 0 for layer in layers)
    monkeypatch.setenv("EMBER_LORA_STACKED", "0")
    assert all(layer.stacked is None for layer in make_engine(base_model, lora_root).adapters.layers)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_side_stream_shrink_gives_the_same_logits(base_model, lora_root, kind, monkeypatch):
    """The separate shrink on a side stream (beside the base projection, in the decode graphs too) changes no bit."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    first = "x" if kind == "lora" else "d"
    logits = {}
    monkeypatch.setenv("EMBER_LORA_STACKED", "0")  # the side stream serves the separate shrink kernel only
    for overlap in (True, False):
        monkeypatch.setenv("EMBER_LORA_OVERLAP", "1" if overlap else "0")  # read before the graphs are captured
        engine = make_engine(base_model, lora_root, device="cuda", fused=True)
        assert engine.adapters.context.overlap == overlap
        engine.adapters.load(first, first)
        engine.adapters.load("y", "y")
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        for (rid, name), prompt in zip({"a": first, "b": "y", "c": None, "a2": first}.items(), prompts(4, 11, 9)):
            engine.add_request(rid, prompt, params, lora=name)
        rec = Recorder(engine).run()
        assert engine.runner.graphs is not None and any(inp_lora is not None for _, _, inp_lora in rec.steps)
        logits[overlap] = [out.logits.clone() for _, out, _ in rec.steps]
    assert len(logits[True]) == len(logits[False])
    for on, off in zip(logits[True], logits[False]):
        assert torch.equal(on, off)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_overlapped_decode_serves_adapters_like_synchronous_steps(base_model, lora_root, device):
    """Decode steps launched ahead (their adapter grouping prepared while the previous step runs) give
    every request the tokens of the synchronous engine, requests ending at different steps included."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    tokens = {}
    for overlap in (False, True):
        engine = make_engine(base_model, lora_root, device=device, extra={"overlap_decode": overlap})
        for name in ("x", "y", "d"):
            engine.adapters.load(name, name)
        names = {"a": "x", "b": "y", "c": None, "e": "d", "f": "x"}
        for i, ((rid, name), prompt) in enumerate(zip(names.items(), prompts(5, 9, seed=11))):
            params = SamplingParams(max_tokens=6 + 2 * i, temperature=0.0, ignore_eos=True)
            engine.add_request(rid, prompt, params, lora=name)
        got: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
        assert (engine.stats().overlapped_steps > 0) == overlap
        tokens[overlap] = got
    assert tokens[True] == tokens[False] and len(tokens[True]) == 5


def test_more_adapters_than_slots_wait_their_turn(base_model, lora_root):
    engine = make_engine(base_model, lora_root, max_loras=2)
    for name in ("x", "y", "d"):
        engine.adapters.load(name, name)
    names = {f"r{i}": name for i, name in enumerate(["x", "y", "d", None, "x", "d"])}
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    for (rid, name), prompt in zip(names.items(), prompts(6, 9, seed=3)):
        engine.add_request(rid, prompt, params, lora=name)
    rec = Recorder(engine).run()
    steps, tokens = rec.steps, rec.tokens
    assert max(len({s.adapter for s in plan.seqs if s.adapter}) for plan, _, _ in steps) <= 2
    assert len(tokens) == 6 and engine.adapters.evictions >= 1
    refs = {name: merged(base_model, lora_root / name) for name in ("x", "y", "d")}
    with torch.no_grad():
        check_logits(steps, tokens, {rid: refs[n] if n else base_model for rid, n in names.items()})


def test_reload_swaps_versions_and_misses_the_old_prefix_cache(base_model, lora_root):
    engine = make_engine(base_model, lora_root)
    engine.adapters.load("x", "x")
    prompt = prompts(1, 40, seed=5)[0]  # two full blocks: cacheable
    params = SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=0, ignore_eos=True)
    engine.add_request("old", prompt, params, lora="x")
    rec = Recorder(engine)
    rec.step()  # "old" is running on version 1 ...
    engine.adapters.load("x", "x2")  # ... when "x" is reloaded
    engine.add_request("new", prompt, params, lora="x")
    assert engine.scheduler.requests["old"].adapter != engine.scheduler.requests["new"].adapter
    steps, tokens = rec.run().steps, rec.tokens
    hits = engine.stats().prefix_cache_hits
    assert hits == 0, "KV computed under the old version was reused for the new one"
    with torch.no_grad():
        check_logits(steps, tokens, {"old": merged(base_model, lora_root / "x"),
                                     "new": merged(base_model, lora_root / "x2")})
    assert engine.adapters.stats()["lora_adapters_resident"] == 1
    assert engine.adapters.host_bytes() == sum(  # the old version is gone, only the new one is held
        t.numel() * t.element_size() for w in engine.adapters._current["x"].modules.values()
        for t in (w.a, w.b) if t is not None)


def test_unload_waits_for_requests_then_frees_memory(base_model, lora_root):
    engine = make_engine(base_model, lora_root)
    baseline = engine.adapters.host_bytes()
    engine.adapters.load("x", "x")
    assert engine.adapters.host_bytes() > baseline
    probe = weakref.ref(engine.adapters._current["x"].modules["model.layers.0.self_attn.q_proj"].a)
    engine.add_request("r", prompts(1, 8, seed=1)[0], SamplingParams(max_tokens=3, ignore_eos=True), lora="x")
    engine.step()
    assert engine.adapters.unload("x", timeout=0) is False  # in flight: the name is gone, the memory is not
    with pytest.raises(InvalidRequestError, match="not loaded"):
        engine.add_request("late", [1, 2, 3], SamplingParams(max_tokens=1), lora="x")
    assert engine.adapters.host_bytes() > baseline
    while engine.has_unfinished():
        engine.step()
    assert engine.adapters.host_bytes() == baseline
    assert probe() is None, "the adapter's host tensors are still referenced after unload"
    assert engine.stats().lora_adapters_resident == 0 and engine.stats().lora_adapters_on_device == 0


def test_adapter_without_lora_serving_is_refused(base_model):
    engine = Engine(EngineConfig(model="", device="cpu", max_model_len=128, kv_cache_tokens=1024),
                    model=copy.deepcopy(base_model), tokenizer=None)
    with pytest.raises(InvalidRequestError, match="serves no adapters"):
        engine.add_request("r", [1, 2], SamplingParams(max_tokens=1), lora="x")


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "missing", "corrupt", "pickle", "rank",
                                  "target", "shape"])
def test_bad_adapters_are_refused_and_nothing_is_loaded(base_model, lora_root, tmp_path, case):
    engine = make_engine(base_model, lora_root)
    outside = tmp_path / "outside"
    write_random_adapter(base_model, outside, seed=9)
    bad = lora_root / f"bad-{case}"
    path, expect = {
        "dotdot": ("x/../x", "'..'"),
        "absolute": (str(outside), "absolute path outside"),
        "symlink": (f"bad-{case}", "symlink"),
        "missing": ("nowhere", "does not exist"),
        "corrupt": (f"bad-{case}", "not a readable safetensors"),
        "pickle": (f"bad-{case}", "never unpickles"),
        "rank": (f"bad-{case}", "above this server's max_lora_rank 8"),
        "target": (f"bad-{case}", "does not adapt"),
        "shape": (f"bad-{case}", "expects a layer"),
    }[case]
    if case == "symlink" and not bad.exists():
        os.symlink(outside, bad)
    elif case in ("corrupt", "pickle"):
        write_random_adapter(base_model, bad, seed=9)
        weights = bad / "adapter_model.safetensors"
        if case == "corrupt":
            weights.write_bytes(weights.read_bytes()[:100])
        else:
            weights.rename(bad / "adapter_model.bin")
    elif case == "rank":
        write_random_adapter(base_model, bad, r=16, seed=9)
    elif case == "target":
        write_random_adapter(base_model, bad, targets=("lm_head",), seed=9)
    elif case == "shape":
        other = Transformer(ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
        write_random_adapter(other, bad, seed=9)
    with pytest.raises(InvalidRequestError) as info:
        engine.adapters.load("bad", path)
    assert expect in info.value.message
    assert isinstance(info.value, AdapterNotFoundError) == (case == "missing")
    assert engine.adapters.adapters() == [] and engine.adapters.host_bytes() == 0


def test_pinned_adapter_stays_resident_and_limits_hold(base_model, lora_root):
    engine = Engine(EngineConfig(model="", device="cpu", max_model_len=128, kv_cache_tokens=2048),
                    model=copy.deepcopy(base_model), tokenizer=None,
                    adapters=AdapterServingConfig(lora_root=str(lora_root), max_loras=2, max_lora_rank=8,
                                                  max_cpu_loras=3))
    reg = engine.adapters
    reg.load("x", "x", pinned=True)
    with pytest.raises(InvalidRequestError, match="pinning would leave no device slot"):
        reg.load("y", "y", pinned=True)
    reg.load("y", "y")
    reg.load("d", "d")
    with pytest.raises(InvalidRequestError, match="max_cpu_loras=3"):
        reg.load("x2", "x2")
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    for i, name in enumerate(["x", "y", "d", "y", "d"]):  # one at a time: y and d take turns in the free slot
        engine.add_request(f"r{i}", [1, 2, 3, 4], params, lora=name)
        while engine.has_unfinished():
            engine.step()
        on_device = {a.name for a in reg.adapters() if a.on_device}
        assert "x" in on_device and name in on_device
    assert reg.evictions == 3
    # With x pinned, a batch holding y and d would need three slots: they are admitted one after the other.
    version = {a.name: a.version for a in reg.adapters()}
    assert reg.fits({("y", version["y"])}) and not reg.fits({("y", version["y"]), ("d", version["d"])})


def test_decode_graph_batches_match_the_eager_grouping(base_model, lora_root):
    """The static segments decode graphs read, at every captured chunk grid that holds the step, give each
    wrapper (packed q/k/v and gate/up included) the same output as the step's own exact grouping."""
    engine = make_engine(base_model, lora_root, max_loras=8, fused=True)
    registry = engine.adapters
    registry.load("x", "x")
    registry.load("d", "d")
    x_key, d_key = ("x", registry._current["x"].version), ("d", registry._current["d"].version)
    adapters = [x_key, None, d_key, x_key, None, x_key]
    registry.enable_graphs(8)
    chunks = registry.prepare_graph_step(adapters, 8)  # 6 sequences padded to a bucket of 8
    assert chunks == 2
    grids = [c for c in registry.graph_chunk_sizes(8) if c >= chunks]
    assert grids == [4, 8]
    eager = registry.prepare_step(adapters + [None, None], [1] * 8)
    gen = torch.Generator().manual_seed(11)
    packed = 0
    for layer in registry.layers:
        packed += len(layer.slice_paths) > 1
        x = torch.randn(8, layer.in_features, generator=gen)
        with registry.context.use(eager):
            want = layer(x)
        for c in grids:
            with registry.context.use(registry.graph_batch(8, c)):
                got = layer(x)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (layer.slice_paths, c)
        assert torch.equal(want[[1, 4, 6, 7]], layer.base_layer(x)[[1, 4, 6, 7]])  # base and padding rows
    assert packed == 2 * base_model.config.num_hidden_layers


def test_decode_graphs_cover_the_highest_slot_of_a_step(base_model, lora_root):
    """A graph with a small chunk grid reads only the A of slots below its grid size (the stacked shrink's
    slot limit), so a step whose adapter sits in a high slot must run in a grid that covers that slot."""
    engine = make_engine(base_model, lora_root, max_loras=8, fused=True)
    registry = engine.adapters
    keys = []
    for i in range(6):  # six versions of one adapter directory: slots 0..5 once all have run
        registry.load(f"a{i}", "x")
        keys.append((f"a{i}", registry._current[f"a{i}"].version))
    registry.prepare_step(keys, [1] * 6)
    assert [registry._current[f"a{i}"].slot for i in range(6)] == list(range(6))
    registry.enable_graphs(8)
    assert registry.graph_chunk_sizes(8) == [4, 8]
    assert registry.graph_batch(8, 4).slot_limit == 4 and registry.graph_batch(8, 8).slot_limit is None
    gen = torch.Generator().manual_seed(5)
    for step, want_grid in (([keys[0], None, keys[0]], 4), ([keys[5], None, keys[5]], 8), ([keys[3]], 4)):
        need = registry.prepare_graph_step(step, 8)
        assert need == max(1, registry._current[step[0][0]].slot + 1)  # one chunk; the slot decides
        bucket = next(c for c in registry.graph_chunk_sizes(8) if c >= need)
        assert bucket == want_grid
        eager = registry.prepare_step(step + [None] * (8 - len(step)), [1] * 8)
        assert eager.slot_limit == registry._current[step[0][0]].slot + 1
        for layer in registry.layers:
            x = torch.randn(8, layer.in_features, generator=gen)
            with registry.context.use(eager):
                want = layer(x)
            with registry.context.use(registry.graph_batch(8, bucket)):
                got = layer(x)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (layer.slice_paths, bucket)
            assert not torch.allclose(want[:1], layer.base_layer(x)[:1])  # the adapter changed the output
