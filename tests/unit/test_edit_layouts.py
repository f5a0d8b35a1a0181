"""The two edit layouts: nano-edit's (ours, on every ComfyUI) and Z-Image Omni's (core's NextDiT, where core has it)."""
from __future__ import annotations

import pytest
import torch
from comfy.ldm.lumina.model import NextDiT
from comfyui_zimage.nodes import loader
from comfyui_zimage.nodes.checkpoint_format import Parts, ZImageFileError, plan_load, read_header
from comfyui_zimage.nodes.compat import nextdit_takes_reference_latents
from comfyui_zimage.nodes.edit import NextDiTWithReference, ZImageEditModel
from zimage_testing.helpers import REPO_ROOT

OMNI = "diffusion_models/tiny-zimage-omni_bf16.safetensors"
CORE_OMNI = nextdit_takes_reference_latents()


def load_dit(path):
    part = loader.dit_part([read_header(path)], path.name)
    return part, loader.plan_dit_config(part)


def test_nano_edit_says_its_layout_and_loads_as_the_edit_model():
    path = REPO_ROOT / "models" / "diffusion_models" / "nano_zimage_edit.safetensors"
    part, dit_config = load_dit(path)
    assert part.metadata["zimage.reference_layout"] == "appended"
    model = loader.load_diffusion_model(part, dit_config, None, None, False, None, reference_images=True).model
    assert type(model) is ZImageEditModel and type(model.diffusion_model) is NextDiTWithReference
    assert model.memory_usage_factor_conds == ("ref_latents",)
    # the memory estimate counts the reference tokens
    ref = torch.zeros(1, 16, 16, 16)
    shapes = {k: [v] for k, v in model.extra_conds_shapes(reference_latents=[ref]).items()}  # one per cond, as the sampler
    assert model.memory_required([1, 16, 16, 16], shapes) > model.memory_required([1, 16, 16, 16])


@pytest.mark.skipif(not CORE_OMNI, reason="this ComfyUI's NextDiT has no Z-Image Omni support")
def test_omni_layout_goes_to_cores_nextdit_with_no_key_dropped(models_dir):
    path = models_dir / OMNI
    part, dit_config = load_dit(path)
    assert dit_config["siglip_feat_dim"] > 0
    model = loader.load_diffusion_model(part, dit_config, None, None, False, None).model
    assert type(model.diffusion_model) is NextDiT and model.diffusion_model.siglip_embedder is not None
    built = set(model.diffusion_model.state_dict()) - {"norm_final.weight"}
    assert built == set(part.shapes), "every tensor of the file has a place in core's model, and every place a tensor"
    for key in ("siglip_embedder.1.weight", "siglip_refiner.0.attention.qkv.weight", "siglip_pad_token"):
        assert not model.diffusion_model.state_dict()[key].is_meta


@pytest.mark.skipif(CORE_OMNI, reason="this ComfyUI runs Z-Image Omni itself")
def test_omni_layout_is_refused_with_a_clear_message_where_core_cannot_run_it(models_dir):
    part, dit_config = load_dit(models_dir / OMNI)
    te = loader.text_encoder_part([read_header(models_dir / "text_encoders/tiny-qwen3_bf16.safetensors")], "te")
    vae = loader.vae_part([read_header(models_dir / "vae/tiny-ae.safetensors")], "vae")
    with pytest.raises(ZImageFileError, match="Omni.*Update ComfyUI"):
        plan_load(Parts(part, te, vae, OMNI), dit_config, part.shapes, vae.shapes, core_runs_omni=CORE_OMNI)


def test_a_tensor_the_model_has_no_place_for_stops_the_load(tmp_path):
    from zimage_testing.checkpoints import save, tiny_dit

    path = save(tmp_path / "tiny-zimage-future.safetensors", {**tiny_dit(), "future_embedder.weight": torch.zeros(4, 4)})
    part, dit_config = load_dit(path)
    with pytest.raises(ZImageFileError, match="future_embedder.weight.*no place|no place.*future_embedder.weight"):
        loader.load_diffusion_model(part, dit_config, None, None, False, None)
