"""Core's Z-Image Fun ControlNet (`ZImageFunControlnet`) acts on every model the loader returns.

The control model is core's own `ZImage_Control` at the nano models' width (the published files are 3840 wide, the
real model's), patched in by the node's own code; the nano VAE encodes the control picture.
"""
from __future__ import annotations

import comfy.ops
import pytest
import torch
from comfy.model_patcher import ModelPatcher
from comfyui_zimage.nodes import loader
from comfyui_zimage.nodes.checkpoint_format import infer_vae_config, read_header
from zimage_testing.helpers import REPO_ROOT

model_patch_nodes = pytest.importorskip("comfy_extras.nodes_model_patch",
                                        reason="this ComfyUI has no Z-Image ControlNet (ZImageFunControlnet)")
controlnet = pytest.importorskip("comfy.ldm.lumina.controlnet", reason="this ComfyUI has no Z-Image ControlNet")
if not hasattr(model_patch_nodes, "ZImageFunControlnet"):
    pytest.skip("this ComfyUI has no ZImageFunControlnet", allow_module_level=True)

MODELS = REPO_ROOT / "models"


def load_dit(name: str) -> ModelPatcher:
    path = MODELS / "diffusion_models" / name
    part = loader.dit_part([read_header(path)], name)
    config = loader.plan_dit_config(part)
    return loader.load_diffusion_model(part, config, torch.float32, None, False, None,
                                       reference_images=name == "nano_zimage_edit.safetensors")


def control_patch(dit: ModelPatcher, dim: int | None = None) -> ModelPatcher:
    dim = dim or dit.model.diffusion_model.dim
    heads = dit.model.diffusion_model.n_heads
    control = controlnet.ZImage_Control(dim=dim, n_heads=heads, n_kv_heads=heads, n_control_layers=3,
                                        refiner_control=True, operations=comfy.ops.manual_cast)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in control.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 / max(p.shape[-1], 1) ** 0.5 if p.ndim > 1 else
                    1.0 + 0.05 * torch.randn(p.shape, generator=gen))
    return ModelPatcher(control, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.fixture(scope="module")
def vae():
    path = MODELS / "vae" / "nano_ae.safetensors"
    part = loader.vae_part([read_header(path)], "nano_ae")
    return loader.load_vae(part, infer_vae_config(part.shapes, "nano_ae"), None)


def predict(dit: ModelPatcher, refs=None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 16, 16, generator=gen)
    ctx = torch.randn(1, 9, dit.model.diffusion_model.cap_embedder[1].in_features, generator=gen)
    sigma = torch.tensor([0.7])
    # as the sampler calls the model: the patcher's wrappers and patches in the transformer options
    options = dict(dit.model_options["transformer_options"], sigmas=sigma, cond_or_uncond=[0], wrappers=dit.wrappers)
    extra = {"ref_latents": refs} if refs is not None else {}
    with torch.no_grad():
        return dit.model.apply_model(x, sigma, c_crossattn=ctx, num_tokens=ctx.shape[1], transformer_options=options,
                                     **extra)


@pytest.mark.parametrize("name", ["nano_zimage_turbo.safetensors", "nano_zimage_base.safetensors",
                                  "nano_zimage_edit.safetensors"])
def test_fun_controlnet_changes_the_output_of_every_model_the_loader_returns(name, vae):
    dit = load_dit(name)
    refs = [torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2))] if "edit" in name else None
    picture = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(3))
    (patched,) = model_patch_nodes.ZImageFunControlnet().diffsynth_controlnet(dit, control_patch(dit), vae, picture, 1.0)
    plain, controlled = predict(dit, refs), predict(patched, refs)
    assert plain.shape == controlled.shape
    assert (controlled - plain).abs().mean() > 1e-3 * plain.abs().mean(), "the control picture did not reach the model"
    # strength 0 adds nothing: the patches run in the right places and change only what they add
    (off,) = model_patch_nodes.ZImageFunControlnet().diffsynth_controlnet(dit, control_patch(dit), vae, picture, 0.0)
    assert torch.allclose(predict(off, refs), plain, atol=1e-6)


def test_a_controlnet_of_another_width_is_refused_with_a_clear_message(vae):
    from comfyui_zimage.nodes.checkpoint_format import ZImageFileError

    dit = load_dit("nano_zimage_turbo.safetensors")
    picture = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(3))
    (patched,) = model_patch_nodes.ZImageFunControlnet().diffsynth_controlnet(dit, control_patch(dit, dim=512), vae,
                                                                               picture, 1.0)
    with pytest.raises(ZImageFileError, match="made for 512-wide models, but the loaded model is 256 wide"):
        predict(patched)
