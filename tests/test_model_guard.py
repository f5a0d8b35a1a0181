"""Every model the loader returns stops at the first NaN or infinity it computes, saying where and why."""
from __future__ import annotations

import pytest
import torch
from comfyui_zimage.nodes import loader
from comfyui_zimage.nodes.checkpoint_format import read_header
from conftest import sampling_graph

from devtools.checkpoint_fixtures import TINY_DIT, save, tiny_dit


def load(path):
    part = loader.dit_part([read_header(path)], path.name)
    return loader.load_diffusion_model(part, loader.plan_dit_config(part), torch.float32, None, False, None)


def call(patcher, x):
    ctx = torch.randn(1, 7, TINY_DIT["cap_feat_dim"], generator=torch.Generator().manual_seed(0))
    options = {"wrappers": patcher.wrappers}  # as the sampler passes them
    with torch.no_grad():
        return patcher.model.apply_model(x, torch.tensor([0.6]), c_crossattn=ctx, num_tokens=7,
                                         transformer_options=options)


def test_nan_weights_stop_the_model_with_the_step_and_the_usual_causes(tmp_path):
    sd = tiny_dit()
    sd["layers.0.feed_forward.w2.weight"][0, 0] = float("nan")
    patcher = load(save(tmp_path / "nan-weights.safetensors", sd))
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with pytest.raises(loader.NonFiniteOutput, match=r"sigma 0\.600 \(in the model itself\).*compute_dtype.*NaN"):
        call(patcher, x)
    healthy = load(save(tmp_path / "healthy.safetensors", tiny_dit()))
    assert torch.isfinite(call(healthy, x)).all()
    with pytest.raises(loader.NonFiniteOutput, match="its input was already non-finite"):
        call(healthy, torch.full_like(x, float("inf")))


def test_a_nan_model_fails_its_prompt_with_that_message_and_the_server_goes_on(client, models_dir):
    sd = tiny_dit()
    sd["final_layer.linear.weight"][0, 0] = float("nan")
    save(models_dir / "diffusion_models" / "broken-nan-zimage-turbo.safetensors", sd)
    try:
        result = client.run(sampling_graph("diffusion_models/broken-nan-zimage-turbo.safetensors",
                                           text_encoder="tiny-qwen3_bf16.safetensors", vae="tiny-ae.safetensors"),
                            timeout=120)
    except Exception as e:  # noqa: BLE001 - a ComfyUI that lists models only at start refuses the new name
        pytest.skip(f"this ComfyUI does not see a model added after start: {e}")
    assert result.status == "error" and result.error["node_type"] == "KSampler"
    assert "NaN or infinite values" in result.error["exception_message"]
    ok = client.run(sampling_graph("diffusion_models/tiny-zimage-turbo_bf16.safetensors"), timeout=300)
    assert ok.status == "success", ok.error
