"""Entropy-pruned attention, in-process: exactness when nothing is pruned, removed work, the entropy maths."""
from __future__ import annotations

import math

import comfy.sample
import comfyui_zimage
import pytest
import torch
from comfy.ldm.lumina.model import JointAttention
from comfyui_zimage.nodes import entropy_attention as ea
from comfyui_zimage.nodes.loader import ZImageCheckpointLoader
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


@pytest.fixture(scope="module")
def nano():
    comfyui_zimage.register_model_folders()
    model, clip, _ = ZImageCheckpointLoader.execute("diffusion_models/nano_zimage_base.safetensors", "nano_qwen3.safetensors",
                                                    "nano_ae.safetensors",
                                                    "default", "default").result[:3]
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("蓝色背景上的红色圆形"))
    uncond = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return model, cond, uncond


def sample(model, cond, uncond, steps=6, cfg=4.0, batch=2, seed=3):
    latent = torch.zeros(batch, 16, 16, 16)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", cond, uncond, latent, seed=seed,
                               disable_pbar=True)


def patched(model, **options):
    return ea.patch_model(model, ea.PruneConfig(**options))


def test_pruning_nothing_reproduces_the_unpatched_model_exactly(nano):
    model, cond, uncond = nano
    expected = sample(model, cond, uncond)  # cfg 4: cond and uncond batched; batch 2
    m = patched(model, keep_ratio=1.0, calibration_steps=2)
    assert torch.equal(sample(m, cond, uncond), expected)
    report = ea.state_of(m).report()
    assert report["decided"] and report["heads_pruned"] == 0 and report["attention_flops_removed"] == 0
    assert torch.equal(sample(model, cond, uncond), expected)  # the input model is untouched


def test_pruning_changes_the_result_a_little_and_reports_it(nano):
    model, cond, uncond = nano
    expected = sample(model, cond, uncond)
    for policy in ea.PRUNED_OUTPUT:
        m = patched(model, keep_ratio=0.5, calibration_steps=2, pruned_heads=policy)
        out = sample(m, cond, uncond)
        report = ea.state_of(m).report()
        assert report["heads_pruned"] >= report["heads_total"] // 2 - len(report["layers"])
        assert 0.2 < report["attention_flops_removed"] < 0.8
        assert not torch.equal(out, expected)
        assert torch.isfinite(out).all()
        pruned = {(layer["layer"], h) for layer in report["layers"] for h in layer["pruned"]}
        for layer in report["layers"]:  # the pruned heads are the spread-out ones of each layer
            kept = [e for h, e in enumerate(layer["entropy"]) if (layer["layer"], h) not in pruned]
            assert kept, "min_heads_per_layer keeps one head"
        all_kept = [e for layer in report["layers"] for h, e in enumerate(layer["entropy"]) if (layer["layer"], h) not in pruned]
        all_pruned = [e for layer in report["layers"] for h, e in enumerate(layer["entropy"]) if (layer["layer"], h) in pruned]
        assert min(all_pruned) >= sorted(all_kept)[len(all_kept) // 2]


def test_calibrating_on_every_step_prunes_nothing_and_warns(nano):
    model, cond, uncond = nano
    m = patched(model, keep_ratio=0.25, calibration_steps=10)
    assert torch.equal(sample(m, cond, uncond, steps=4), sample(model, cond, uncond, steps=4))
    report = ea.state_of(m).report()
    assert report["heads_pruned"] == 0
    assert any("not below the 4 sampling steps" in w for w in report["warnings"])


def test_a_new_run_calibrates_afresh(nano):
    model, cond, uncond = nano
    m = patched(model, keep_ratio=0.5, calibration_steps=1)
    first = sample(m, cond, uncond)
    assert torch.equal(sample(m, cond, uncond), first)  # state reset by the OUTER_SAMPLE wrapper


def attention_module(model) -> tuple[str, JointAttention]:
    name = "layers.0.attention"
    return name, model.model.diffusion_model.get_submodule(name)


def attention_inputs(module: JointAttention, model, n=40, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dim = module.head_dim * module.n_local_heads
    x = torch.randn(batch, n, dim, generator=gen)
    pos = torch.zeros(batch, n, 3)
    pos[:, :, 1] = torch.arange(n) // 8
    pos[:, :, 2] = torch.arange(n) % 8
    freqs = model.model.diffusion_model.rope_embedder(pos).movedim(1, 2)
    return x, freqs


def pruned_layer(module, name, pruned) -> ea.LayerState:
    layer = ea.LayerState(name, module.n_local_heads, module.head_dim)
    layer.pruned = sorted(pruned)
    layer.keep = [h for h in range(module.n_local_heads) if h not in pruned]
    return layer


@torch.no_grad()
def test_pruned_heads_projections_and_attention_are_not_computed(nano):
    model = nano[0]
    name, module = attention_module(model)
    x, freqs = attention_inputs(module, model)
    heads = module.n_local_heads
    state = ea.PruneState(ea.PruneConfig(pruned_heads="zero"), model_dim=x.shape[-1])
    state.layers[name] = pruned_layer(module, name, pruned=list(range(0, heads, 2)))
    forward = ea.AttentionForward(module, state, name)

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    full = flops(lambda: JointAttention.forward(module, x, None, freqs))
    pruned = flops(lambda: forward(x, None, freqs, transformer_options={ea.PHASE_KEY: ea.PRUNE}))
    kept = heads - len(state.layers[name].pruned)
    assert full > 0 and pruned == full * kept // heads  # qkv rows, attention and out columns all scale with heads


@torch.no_grad()
def test_kept_heads_give_the_full_output_without_the_pruned_heads_terms(nano):
    model = nano[0]
    name, module = attention_module(model)
    x, freqs = attention_inputs(module, model)
    heads, hd = module.n_local_heads, module.head_dim
    pruned = [1, heads - 1]
    q, k, v = ea.project(module, x, freqs)
    per_head = torch.nn.functional.scaled_dot_product_attention(q, k, v).movedim(1, 2).flatten(2)  # (B, N, heads*hd)
    drop = torch.zeros(heads * hd, dtype=torch.bool)
    for h in pruned:
        drop[h * hd:(h + 1) * hd] = True
    expected = module.out(per_head.masked_fill(drop, 0.0))
    state = ea.PruneState(ea.PruneConfig(pruned_heads="zero"), model_dim=x.shape[-1])
    state.layers[name] = pruned_layer(module, name, pruned)
    out = ea.AttentionForward(module, state, name)(x, None, freqs, transformer_options={ea.PHASE_KEY: ea.PRUNE})
    assert torch.allclose(out, expected, atol=1e-5)

    # reuse: the cached output of the same input restores the full layer
    state = ea.PruneState(ea.PruneConfig(pruned_heads="reuse"), model_dim=x.shape[-1])
    state.layers[name] = ea.LayerState(name, heads, hd)
    forward = ea.AttentionForward(module, state, name)
    calibrated = forward(x, None, freqs, transformer_options={ea.PHASE_KEY: ea.CALIBRATE})
    assert torch.equal(calibrated, JointAttention.forward(module, x, None, freqs))
    state.layers[name].pruned, state.layers[name].keep = pruned, [h for h in range(heads) if h not in pruned]
    reused = forward(x, None, freqs, transformer_options={ea.PHASE_KEY: ea.PRUNE})
    assert torch.allclose(reused, calibrated, atol=1e-5)


def test_entropy_of_uniform_and_of_peaked_attention():
    n, d = 64, 16
    k = torch.randn(1, 2, n, d)
    q = torch.zeros(1, 2, n, d)
    q[0, 1] = 40.0 * k[0, 1, 5]  # head 1: every query looks at key 5
    entropy = ea.attention_entropy(q, k, None, queries=16)
    assert entropy[0].item() == pytest.approx(1.0, abs=1e-5)
    assert entropy[1].item() < 0.05


def test_entropy_is_normalised_by_the_keys_a_mask_leaves():
    n, d = 64, 8
    q, k = torch.zeros(2, 1, n, d), torch.randn(2, 1, n, d)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[:, n // 2:] = False  # half the keys are padding
    bias = ea.mask_bias(mask[:, None, :].expand(2, n, n), torch.arange(n), n)
    assert bias.shape == (2, 1, n, n)
    entropy = ea.attention_entropy(q, k, mask[:, None, :].expand(2, n, n), queries=n)
    assert entropy.item() == pytest.approx(1.0, abs=1e-5)  # uniform over the n/2 real keys
    unmasked = ea.attention_entropy(q, k, None, queries=n)
    assert unmasked.item() == pytest.approx(1.0, abs=1e-5)
    assert math.isfinite(entropy.item())


def test_entropy_measurement_holds_a_bounded_slice_of_logits(monkeypatch):
    monkeypatch.setattr(ea, "ENTROPY_CHUNK_ELEMENTS", 1000)
    q, k = torch.randn(1, 6, 50, 8), torch.randn(1, 6, 50, 8)
    chunked = ea.attention_entropy(q, k, None, queries=20)
    monkeypatch.setattr(ea, "ENTROPY_CHUNK_ELEMENTS", 1 << 25)
    assert torch.allclose(chunked, ea.attention_entropy(q, k, None, queries=20))


@pytest.mark.parametrize("options, words", [(dict(keep_ratio=1.5), "keep_ratio 1.5 is outside"),
                                            (dict(threshold=-0.1), "threshold -0.1 is outside"),
                                            (dict(attention_backend="warp-drive"), "not available"),
                                            (dict(pruned_heads="average"), "pruned_heads"),
                                            (dict(refresh_every=-1), "refresh_every -1")])
def test_bad_options_are_refused(nano, options, words):
    with pytest.raises(ea.PruningError, match=words):
        patched(nano[0], **options)


def test_threshold_rule_prunes_the_heads_above_it(nano):
    model, cond, uncond = nano
    m = patched(model, rule="threshold", threshold=0.5, calibration_steps=2, min_heads_per_layer=0)
    sample(m, cond, uncond)
    report = ea.state_of(m).report()
    for layer in report["layers"]:
        for h, e in enumerate(layer["entropy"]):
            assert (h in layer["pruned"]) == (e > 0.5)


def test_backend_choice_runs_the_chosen_function(nano, monkeypatch):
    model, cond, uncond = nano
    calls = []
    original = ea.comfy_attention.REGISTERED_ATTENTION_FUNCTIONS["split"]
    monkeypatch.setitem(ea.comfy_attention.REGISTERED_ATTENTION_FUNCTIONS, "split",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    m = patched(model, keep_ratio=1.0, attention_backend="split")
    out = sample(m, cond, uncond, steps=2)
    assert calls and torch.allclose(out, sample(model, cond, uncond, steps=2), atol=1e-4)



def test_lora_patches_reach_the_kept_heads(nano):
    model, cond, uncond = nano
    key = "diffusion_model.layers.0.attention.qkv.weight"
    weight = model.model.diffusion_model.get_parameter("layers.0.attention.qkv.weight")
    lora = model.clone()
    lora.add_patches({key: (0.2 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)),)}, 1.0)
    with_lora = sample(lora, cond, uncond)
    assert not torch.equal(with_lora, sample(model, cond, uncond))
    assert torch.equal(sample(patched(lora, keep_ratio=1.0), cond, uncond), with_lora)


@torch.no_grad()
def test_weight_functions_of_low_vram_loading_are_applied_to_the_kept_rows(nano):
    """In low-VRAM mode ComfyUI applies LoRA on the fly through `weight_function`; the kept rows must see it."""
    model = nano[0]
    name, module = attention_module(model)
    x, freqs = attention_inputs(module, model)
    heads = module.n_local_heads
    delta = 0.1 * torch.randn(module.qkv.weight.shape, generator=torch.Generator().manual_seed(6))
    state = ea.PruneState(ea.PruneConfig(pruned_heads="zero"), model_dim=x.shape[-1])
    state.layers[name] = pruned_layer(module, name, pruned=[0])
    original = module.qkv.weight.data.clone()
    try:
        module.qkv.weight.data += delta  # the weights LoRA would give
        expected = ea.AttentionForward(module, state, name)(x, None, freqs, transformer_options={ea.PHASE_KEY: ea.PRUNE})
        module.qkv.weight.data.copy_(original)
        module.qkv.weight_function = [lambda w: w + delta.to(w)]
        out = ea.AttentionForward(module, state, name)(x, None, freqs, transformer_options={ea.PHASE_KEY: ea.PRUNE})
    finally:
        module.qkv.weight_function = []
        module.qkv.weight.data.copy_(original)
    assert heads > 1 and torch.allclose(out, expected, atol=1e-5)


class OpRecorder(TorchDispatchMode):
    """The aten ops a block of code runs."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def test_the_kept_heads_weights_are_cut_once_and_pruned_steps_gather_nothing(nano):
    model = nano[0]
    name, module = attention_module(model)
    x, freqs = attention_inputs(module, model)
    state = ea.PruneState(ea.PruneConfig(pruned_heads="reuse"), model_dim=x.shape[-1])
    state.layers[name] = ea.LayerState(name, module.n_local_heads, module.head_dim)
    forward = ea.AttentionForward(module, state, name)
    forward(x, None, freqs, transformer_options={ea.PHASE_KEY: ea.CALIBRATE})
    layer = state.layers[name]
    layer.pruned, layer.keep = [0, 2], [h for h in range(module.n_local_heads) if h not in (0, 2)]
    prune = {ea.PHASE_KEY: ea.PRUNE}
    first = forward(x, None, freqs, transformer_options=prune)
    with OpRecorder() as recorder:
        again = forward(x, None, freqs, transformer_options=prune)
    assert torch.equal(first, again)
    assert not {"index_select", "gather", "index", "cat"} & set(recorder.ops), str(recorder.ops)
    assert recorder.ops.count("mm") + recorder.ops.count("addmm") == 2  # the kept heads' qkv, then their out
    packed = layer.packed[(x.device, x.dtype)]
    assert packed.qkv_weight.shape == (3 * len(layer.keep) * module.head_dim, x.shape[-1])
    assert packed.out_weight.shape == (x.shape[-1], len(layer.keep) * module.head_dim)


@torch.no_grad()
def test_track_mean_restores_a_uniformly_attending_head_exactly_on_a_new_input(nano):
    """A head whose queries are zero attends uniformly: its output is the mean of its values, a linear map of the
    input's token mean. track_mean shifts the cached output by exactly that change; reuse keeps the old output."""
    model = nano[0]
    name, module = attention_module(model)
    x, freqs = attention_inputs(module, model)
    x2 = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    heads, hd = module.n_local_heads, module.head_dim
    original = module.qkv.weight.data.clone()
    try:
        module.qkv.weight.data[hd:2 * hd] = 0.0  # head 1's q rows: zero queries, uniform attention
        expected = JointAttention.forward(module, x2, None, freqs)
        results = {}
        for mode in ("track_mean", "reuse"):
            state = ea.PruneState(ea.PruneConfig(pruned_heads=mode), model_dim=x.shape[-1])
            state.layers[name] = ea.LayerState(name, heads, hd)
            forward = ea.AttentionForward(module, state, name)
            forward(x, None, freqs, transformer_options={ea.PHASE_KEY: ea.CALIBRATE})
            state.layers[name].pruned, state.layers[name].keep = [1], [h for h in range(heads) if h != 1]
            results[mode] = forward(x2, None, freqs, transformer_options={ea.PHASE_KEY: ea.PRUNE})
    finally:
        module.qkv.weight.data.copy_(original)
    assert torch.allclose(results["track_mean"], expected, atol=1e-5)
    assert not torch.allclose(results["reuse"], expected, atol=1e-3)


def test_refresh_steps_come_after_every_few_pruned_ones_and_never_last(nano):
    state = ea.PruneState(ea.PruneConfig(calibration_steps=2, refresh_every=2), model_dim=8)
    sigmas = torch.linspace(1.0, 0.0, 9)
    phases = [state.phase({"sample_sigmas": sigmas, "sigmas": sigmas[i:i + 1]}) for i in range(8)]
    c, p, r = ea.CALIBRATE, ea.PRUNE, ea.REFRESH
    assert phases == [c, c, p, p, r, p, p, p]
    mid = (sigmas[0] + sigmas[1]) / 2  # a second-order sampler's evaluation between two steps: the first one's
    assert state.phase({"sample_sigmas": sigmas, "sigmas": mid[None]}) == c


def test_refreshing_runs_full_steps_between_pruned_ones_and_counts_them(nano):
    model, cond, uncond = nano
    m = patched(model, keep_ratio=0.5, calibration_steps=2, refresh_every=1, pruned_heads="track_mean")
    out = sample(m, cond, uncond, steps=6)
    report = ea.state_of(m).report()
    assert torch.isfinite(out).all() and not torch.equal(out, sample(model, cond, uncond, steps=6))
    calls = report["model_calls"]  # steps 0, 1 calibrate; 2 pruned; 3 refresh; 4, 5 pruned (n calls a step)
    n = calls["refresh"]
    assert n >= 1 and calls == {"calibrate": 2 * n, "prune": 3 * n, "refresh": n}
    assert 0 < report["attention_flops_removed_run"] == pytest.approx(report["attention_flops_removed"] * 3 / 6, abs=1e-3)
    refreshed = sample(m, cond, uncond, steps=6)
    never = patched(model, keep_ratio=0.5, calibration_steps=2, refresh_every=0, pruned_heads="track_mean")
    assert torch.equal(refreshed, out) and not torch.equal(sample(never, cond, uncond, steps=6), out)


def test_the_kept_heads_attention_goes_through_an_override_already_on_the_model(nano):
    """Core's BlockSparseAttention is an attention override: the kept heads' call must reach it, and a backend
    chosen here becomes the function it falls back to."""
    model, cond, uncond = nano
    seen = []

    def recording_override(func, q, k, v, heads, *args, **kwargs):
        seen.append((heads, func))
        return func(q, k, v, heads, *args, **kwargs)

    with_override = model.clone()
    with_override.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = recording_override
    m = patched(with_override, keep_ratio=0.5, calibration_steps=2, attention_backend="pytorch")
    sample(m, cond, uncond, steps=4)
    report = ea.state_of(m).report()
    full = {layer["layer"]: 0 for layer in report["layers"]}
    assert seen and all(func is ea.comfy_attention.get_attention_function("pytorch") for _, func in seen)
    kept_counts = {4 - len(layer["pruned"]) for layer in report["layers"] if layer["pruned"]}
    assert kept_counts and kept_counts & {heads for heads, _ in seen}  # calls with only the kept heads
    assert full
