"""In-process unit tests of header reading and size inference, and the real 6B layout on the meta device."""
from __future__ import annotations

import struct

import comfy.model_detection
import comfy.ops
import comfy.text_encoders.llama as llama
import pytest
import torch
from comfy.ldm.lumina.model import NextDiT
from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder
from comfyui_zimage.nodes import loader
from comfyui_zimage.nodes.checkpoint_format import (
    ZImageFileError,
    default_axes_dims,
    describe_foreign_layout,
    detect_variant,
    infer_dit_config,
    infer_qwen3_config,
    infer_vae_config,
    read_header,
)
from comfyui_zimage.nodes.edit import qwen3_model_class

# The published configurations of the released models (Tongyi-MAI/Z-Image-Turbo transformer/config.json,
# Qwen/Qwen3-4B config.json, black-forest-labs FLUX.1 ae).
ZIMAGE_TURBO = {"in_channels": 16, "dim": 3840, "n_layers": 30, "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30,
                "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0,
                "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "patch_size": 2}
QWEN3_4B = {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128}
FLUX_VAE = {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "z_channels": 16}


def meta_shapes(module: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def turbo_6b_shapes():
    """The real Z-Image-Turbo key layout, built from the published config on `meta` (no 12 GB allocation)."""
    with torch.device("meta"):
        model = NextDiT(patch_size=2, in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30,
                        n_kv_heads=30, multiple_of=256, ffn_dim_multiplier=8.0 / 3.0, norm_eps=1e-5, qk_norm=True,
                        cap_feat_dim=2560, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0,
                        z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32,
                        operations=comfy.ops.disable_weight_init)
    shapes = meta_shapes(model)
    shapes.pop("norm_final.weight", None)  # older NextDiT builds it, unused in forward; absent from the released file
    return shapes


def test_real_turbo_layout_gives_the_published_config(turbo_6b_shapes):
    config = infer_dit_config(turbo_6b_shapes, "z_image_turbo_bf16.safetensors")
    for key in ("in_channels", "dim", "n_layers", "n_refiner_layers", "n_heads", "n_kv_heads", "cap_feat_dim",
                "axes_dims", "axes_lens", "rope_theta", "patch_size", "qk_norm", "norm_eps"):
        assert config[key] == ZIMAGE_TURBO[key], key
    assert config["time_scale"] == ZIMAGE_TURBO["t_scale"]
    assert config["pad_tokens_multiple"] == 32 and config["z_image_modulation"]
    # About 6.15 billion parameters, as published.
    params = sum(torch.Size(s).numel() for s in turbo_6b_shapes.values())
    assert 6.0e9 < params < 6.3e9
    # ComfyUI core's own detection (which knows only this size) agrees on every field it sets.
    core = comfy.model_detection.detect_unet_config({k: torch.empty(s, device="meta") for k, s in turbo_6b_shapes.items()}, "")
    for key, value in core.items():
        if key != "ffn_dim_multiplier":
            assert config[key] == value, key
    assert config["ffn_dim_multiplier"] == pytest.approx(core["ffn_dim_multiplier"])


def test_loader_builds_exactly_the_real_keys_on_meta(turbo_6b_shapes):
    import comfy.supported_models

    config = infer_dit_config(turbo_6b_shapes, "z_image_turbo_bf16.safetensors")
    model_config = comfy.supported_models.ZImage(dict(config))
    model_config.set_inference_dtype(torch.bfloat16, None)
    model = model_config.get_model({}, "", device=torch.device("meta"))
    built = meta_shapes(model.diffusion_model)
    built.pop("norm_final.weight", None)
    assert built == turbo_6b_shapes


def test_diffusers_layout_of_the_real_model_converts_back(turbo_6b_shapes):
    from zimage_testing.checkpoints import dit_to_diffusers

    meta = {k: torch.empty(s, device="meta") for k, s in turbo_6b_shapes.items()}
    diffusers = dit_to_diffusers(meta)
    assert "layers.29.attention.to_q.weight" in diffusers and "all_x_embedder.2-1.weight" in diffusers
    back = {k: tuple(v.shape) for k, v in loader.convert_diffusers_dit(diffusers).items()}
    assert back == turbo_6b_shapes


def test_real_qwen3_4b_layout_gives_its_config():
    with torch.device("meta"):
        wrapper = torch.nn.Module()
        wrapper.model = llama.Llama2_(llama.Qwen3_4BConfig(), device="meta", dtype=torch.bfloat16,
                                      ops=comfy.ops.disable_weight_init)
    shapes = meta_shapes(wrapper)
    assert infer_qwen3_config(shapes, "qwen_3_4b.safetensors") == QWEN3_4B
    # The package's sized Qwen3 at these sizes is ComfyUI's Qwen3_4B, key for key and shape for shape.
    with torch.device("meta"):
        ours = qwen3_model_class(QWEN3_4B)({}, torch.bfloat16, "meta", comfy.ops.disable_weight_init)
        core = llama.Qwen3_4B({}, torch.bfloat16, "meta", comfy.ops.disable_weight_init)
    assert meta_shapes(ours) == meta_shapes(core)


def test_real_flux_vae_layout_gives_its_config():
    cfg = dict(double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
               num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    with torch.device("meta"):
        vae = torch.nn.Module()
        vae.encoder, vae.decoder = Encoder(**cfg), Decoder(**cfg)
    inferred = infer_vae_config(meta_shapes(vae), "ae.safetensors")
    assert inferred == cfg
    assert {k: inferred[k] for k in FLUX_VAE} == FLUX_VAE


def test_default_axes_dims_match_the_real_split_and_stay_even():
    assert default_axes_dims(128) == [32, 48, 48]
    for head_dim in (16, 32, 64, 96, 128, 256):
        dims = default_axes_dims(head_dim)
        assert sum(dims) == head_dim and all(d % 2 == 0 and d > 0 for d in dims)


def write_raw(path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize("name,content,phrase", [
    ("empty.safetensors", b"", "empty or truncated"),
    ("huge-header.safetensors", struct.pack("<Q", 1 << 40) + b"{}", "not a valid safetensors"),
    ("garbage.safetensors", struct.pack("<Q", 5) + b"\xff\xfe{[x", "header is corrupt"),
])
def test_read_header_names_the_file_and_the_damage(tmp_path, name, content, phrase):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ZImageFileError) as e:
        read_header(path)
    assert name in str(e.value) and phrase in str(e.value)


def test_read_header_detects_truncation_and_refuses_pickles(tmp_path):
    path = tmp_path / "cut.safetensors"
    write_raw(path, b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', bytes(8))
    with pytest.raises(ZImageFileError, match="truncated"):
        read_header(path)
    pickle_file = tmp_path / "model.ckpt"
    pickle_file.write_bytes(b"x")
    with pytest.raises(ZImageFileError, match="only .safetensors"):
        read_header(pickle_file)
    ok = tmp_path / "ok.safetensors"
    write_raw(ok, b'{"__metadata__": {"zimage.variant": "base"}, "w": {"dtype": "BF16", "shape": [2, 4], '
                  b'"data_offsets": [0, 16]}}', bytes(16))
    header = read_header(ok)
    assert header.tensors["w"].shape == (2, 4) and header.nbytes == 16 and header.metadata["zimage.variant"] == "base"


def test_a_header_cannot_declare_more_than_the_file_holds(tmp_path):
    """Each tensor must hold the bytes its shape declares, and no two may share bytes: a model sized from the
    header is never larger than the file."""
    path = tmp_path / "inflated.safetensors"
    write_raw(path, b'{"layers.0.w": {"dtype": "BF16", "shape": [3840, 11520], "data_offsets": [0, 0]}}')
    with pytest.raises(ZImageFileError, match=r"inflated.safetensors: tensor 'layers.0.w' declares shape \[3840, 11520\]"):
        read_header(path)
    write_raw(path, b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, '
                    b'"b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}', bytes(24))
    with pytest.raises(ZImageFileError, match="share bytes"):
        read_header(path)
    write_raw(path, b'{"a": {"dtype": "F32", "shape": [-4], "data_offsets": [16, 0]}}', bytes(16))
    with pytest.raises(ZImageFileError, match="malformed"):
        read_header(path)


def stray_blocks(shapes: dict, prefix: str, first: int, count: int, empty: bool) -> dict:
    """Block entries a header edit could add: copies of block 0's names, empty (shape 0) or real-shaped."""
    block0 = {k[len(prefix) + 2:]: v for k, v in shapes.items() if k.startswith(prefix + "0.")}
    return {f"{prefix}{i}.{k}": ((0,) if empty else v) for i in range(first, first + count) for k, v in block0.items()}


@pytest.mark.parametrize("what", ["gap", "empty"])
def test_block_counts_come_only_from_blocks_that_are_there(turbo_6b_shapes, what):
    """One stray key `layers.99999999.…`, or a run of empty blocks, must not size a model of 10^8 layers."""
    import time

    from zimage_testing.checkpoints import tiny_qwen3, tiny_vae

    te = {k: tuple(v.shape) for k, v in tiny_qwen3().items()}
    vae = {k: tuple(v.shape) for k, v in tiny_vae().items()}
    if what == "gap":
        cases = [(infer_dit_config, {**turbo_6b_shapes, "layers.99999999.attention.qkv.weight": (0,)}, "99999999"),
                 (infer_qwen3_config, {**te, "model.layers.99999999.self_attn.q_proj.weight": (0,)}, "99999999"),
                 (infer_vae_config, {**vae, "encoder.down.0.block.99999999.conv2.weight": (32, 32, 3, 3)}, "99999999")]
    else:
        cases = [(infer_dit_config, {**turbo_6b_shapes, **stray_blocks(turbo_6b_shapes, "layers.", 30, 1000, True)},
                  "layers.30"),
                 (infer_qwen3_config, {**te, **stray_blocks(te, "model.layers.", 3, 1000, True)}, "model.layers.3"),
                 (infer_vae_config, {**vae, **stray_blocks(vae, "encoder.down.0.block.", 2, 1000, True)},
                  "encoder.down.0.block.2")]
    for infer, shapes, words in cases:
        start = time.perf_counter()
        with pytest.raises(ZImageFileError) as e:
            infer(shapes, "edited.safetensors")
        assert "edited.safetensors" in str(e.value) and words in str(e.value) and "edited" in str(e.value)
        assert time.perf_counter() - start < 5


def test_lumina2_and_foreign_layouts_are_named():
    with pytest.raises(ZImageFileError, match="Lumina-2"):
        infer_dit_config({"layers.0.adaLN_modulation.1.weight": (1,)}, "lumina.safetensors")
    assert "SD1" in describe_foreign_layout(["model.diffusion_model.input_blocks.0.0.weight"])
    assert "Flux" in describe_foreign_layout(["double_blocks.0.img_attn.qkv.weight"])
    assert "LoRA" in describe_foreign_layout(["diffusion_model.layers.0.attention.out.lora_A.weight"])


@pytest.mark.parametrize("name,metadata,expected", [
    ("z_image_turbo_bf16.safetensors", {}, "turbo"),
    ("Z-Image-Base.safetensors", {}, "base"),
    ("z_image_omni_bf16.safetensors", {}, "edit"),
    ("my-model.safetensors", {"zimage.variant": "edit"}, "edit"),
    ("turbo-named.safetensors", {"zimage.variant": "base"}, "base"),  # metadata wins over the name
    ("unknown.safetensors", {}, "turbo"),
])
def test_detect_variant(name, metadata, expected):
    assert detect_variant(name, metadata)[0] == expected


def test_bad_dit_metadata_is_a_message_naming_the_file(turbo_6b_shapes):
    for bad in ("{not json", "[1, 2]"):
        with pytest.raises(ZImageFileError, match="odd.safetensors: its metadata zimage.dit_config is not a valid JSON"):
            infer_dit_config(turbo_6b_shapes, "odd.safetensors", {"zimage.dit_config": bad})
