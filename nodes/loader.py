"""Z-Image Checkpoint Loader: split files, all-in-one checkpoints and diffusers folders, at any size.

ComfyUI core recognises Z-Image only at the 6B size (dim 3840) and only as split files. This loader
infers every size from tensor shapes, so the nano models and the real ones share one code path, and it
returns the standard MODEL / CLIP / VAE objects core nodes expect.

Memory: models are built on the `meta` device and the file tensors are then assigned into them, so a
weight whose dtype already matches is the memory-mapped file page itself (never copied); a weight that
must be cast is converted tensor by tensor while the file is re-opened in chunks, so pages already read
leave the process instead of piling up.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import comfy.sd
import comfy.supported_models
import comfy.text_encoders.z_image as z_image
import comfy.utils
import folder_paths
import torch
from comfy import diffusers_convert, sd1_clip
from comfy.ldm.models.autoencoder import AutoencoderKL
from comfy_api.latest import io
from safetensors import SafetensorError, safe_open

from .checkpoint_format import (
    COMPUTE_DTYPES,
    SAMPLING_SETTINGS,
    WEIGHT_DTYPES,
    LoadPlan,
    Part,
    Parts,
    SafetensorsHeader,
    ZImageFileError,
    describe_foreign_layout,
    dit_part,
    dtype_choice,
    infer_dit_config,
    infer_vae_config,
    is_quantized,
    most_common_dtype,
    plan_load,
    read_header,
    text_encoder_config,
    text_encoder_part,
    vae_part,
)
from .compat import (
    ComboOutput,
    Quantization,
    apply_quantization,
    nextdit_takes_reference_latents,
    prepare_quantized,
    quant_formats,
)
from .edit import ZImageEditModel, qwen3_model_class
from .model_guard import GUARD_KEY, add_interrupt_checks, check_cfg, guard_model_call, guard_vae

log = logging.getLogger("comfyui-zimage")

AUTO = "auto"
# Safetensors dtype names (the files' and the dtype choices', see checkpoint_format.WEIGHT_DTYPES) as torch dtypes.
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
SOURCE_FOLDERS = ("diffusion_models", "checkpoints", "diffusers")


class ZImageCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageCheckpointLoader",
            display_name="Z-Image Checkpoint Loader",
            category="Z-Image/loaders",
            description="Loads a Z-Image diffusion model, its Qwen3 text encoder and its Flux VAE from split "
                        "files, one all-in-one checkpoint or a diffusers folder, at any model size, and "
                        "outputs the sampling settings recommended for the variant.",
            inputs=[
                io.Combo.Input("model", options=list_model_sources(),
                               tooltip="The diffusion model: a file in models/diffusion_models, an all-in-one "
                                       "checkpoint in models/checkpoints, or a diffusers folder in models/diffusers. "
                                       "Only .safetensors files are listed."),
                io.Combo.Input("text_encoder", options=[AUTO] + safetensors_files("text_encoders"), optional=True, default=AUTO,
                               tooltip="The Qwen3 text encoder (qwen_3_4b.safetensors for real Z-Image). 'auto' takes "
                                       "it from the checkpoint or diffusers folder, else the one file in "
                                       "models/text_encoders whose width fits the model."),
                io.Combo.Input("vae", options=[AUTO] + safetensors_files("vae"), optional=True, default=AUTO,
                               tooltip="The 16-channel Flux VAE (ae.safetensors for real Z-Image). 'auto' takes it from "
                                       "the checkpoint or diffusers folder, else the one 16-channel file in models/vae."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), optional=True, default="default",
                               tooltip="Storage dtype of the diffusion model's weights. 'default' lets ComfyUI choose for "
                                       "your device; fp8 halves memory at a small quality cost (fp8_e4m3fn_fast also "
                                       "computes in fp8 on GPUs that support it)."),
                io.Combo.Input("compute_dtype", options=list(COMPUTE_DTYPES), optional=True, default="default",
                               tooltip="Dtype the diffusion model computes in when weights are stored in another "
                                       "(e.g. fp8). 'default' lets ComfyUI choose for your device."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.Clip.Output(display_name="CLIP"),
                io.Vae.Output(display_name="VAE"),
                io.Int.Output(display_name="steps", tooltip="Recommended steps for this variant."),
                io.Float.Output(display_name="cfg", tooltip="Recommended CFG for this variant."),
                io.Float.Output(display_name="shift", tooltip="Recommended ModelSamplingAuraFlow shift."),
                ComboOutput(display_name="sampler", options=comfy.samplers.KSampler.SAMPLERS,
                            tooltip="Recommended sampler."),
                ComboOutput(display_name="scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                            tooltip="Recommended scheduler."),
                io.String.Output(display_name="variant", tooltip="turbo, base or edit, and how it was told."),
            ],
        )

    @classmethod
    def execute(cls, model, text_encoder=AUTO, vae=AUTO, weight_dtype="default", compute_dtype="default") -> io.NodeOutput:
        parts, plan = resolve_and_plan(model, text_encoder, vae, weight_dtype, compute_dtype)
        pbar = MegabyteProgress(sum(p.nbytes for p in (parts.dit, parts.text_encoder, parts.vae)))
        dit = load_diffusion_model(parts.dit, plan.dit_config, TORCH_DTYPES.get(plan.weight_dtype),
                                   TORCH_DTYPES.get(plan.compute_dtype), plan.fp8_fast, pbar,
                                   reference_images=plan.reference_images)
        clip = load_text_encoder(parts.text_encoder, plan.text_encoder_config, pbar)
        vae_obj = load_vae(parts.vae, plan.vae_config, pbar)
        dit.model.zimage_variant = plan.variant  # read by the k_gen probe to label its history
        s = SAMPLING_SETTINGS[plan.variant]
        log.info("Z-Image %s loaded (%s); dim %d, %d layers; text encoder %s; VAE %s", plan.variant, plan.variant_reason,
                 plan.dit_config["dim"], plan.dit_config["n_layers"], parts.text_encoder.label, parts.vae.label)
        return io.NodeOutput(dit, clip, vae_obj, s["steps"], s["cfg"], s["shift"], s["sampler"], s["scheduler"],
                             f"{plan.variant} ({plan.variant_reason})")


class MegabyteProgress:
    """The loader's progress bar, in MiB (a byte count shows as 21123878/21123878), and none at all for a load under
    64 MiB (the nano family), which is over before a bar could say anything."""

    def __init__(self, total_bytes: int):
        self.bar = comfy.utils.ProgressBar(-(-total_bytes >> 20)) if total_bytes >= 64 << 20 else None
        self.done = 0

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        if self.bar is not None:
            self.bar.update_absolute(min(self.bar.total, self.done >> 20))


# ---------------------------------------------------------------------------------------------------
# Finding the files.

# The nano family ships inside this package. Core's loaders cannot load its files (core's detection has no nano
# sizes, and fails with an empty AssertionError), so they are registered under kinds of our own that only this
# loader lists, beside ComfyUI's own folders, under the same names.
PACKAGE_KINDS = ("diffusion_models", "text_encoders", "vae", "checkpoints", "diffusers")


def package_kind(kind: str) -> str:
    return f"zimage_nano_{kind}"


def register_package_models(models_dir: Path) -> None:
    for kind in PACKAGE_KINDS:
        folder = Path(models_dir) / kind
        if folder.is_dir():
            folder_paths.add_model_folder_path(package_kind(kind), str(folder))


def kinds_of(kind: str) -> list[str]:
    """ComfyUI's folder kind, then the package's, where registered."""
    return [k for k in (kind, package_kind(kind)) if k in folder_paths.folder_names_and_paths]


def safetensors_files(folder: str) -> list[str]:
    names = {n for kind in kinds_of(folder) for n in folder_paths.get_filename_list(kind)}
    return sorted(n for n in names if n.lower().endswith(".safetensors"))


def diffusers_bases() -> list[str]:
    return [base for kind in kinds_of("diffusers") for base in folder_paths.get_folder_paths(kind)]


def diffusers_folders() -> list[str]:
    found = []
    for base in diffusers_bases():
        base = Path(base)
        if base.is_dir():
            for index in sorted(base.rglob("transformer")):
                if index.is_dir() and any(index.glob("*.safetensors")):
                    found.append(index.parent.relative_to(base).as_posix())
    return found


def list_model_sources() -> list[str]:
    return ([f"diffusion_models/{n}" for n in safetensors_files("diffusion_models")]
            + [f"checkpoints/{n}" for n in safetensors_files("checkpoints")]
            + [f"diffusers/{n}" for n in diffusers_folders()])


def full_path(folder: str, name: str) -> Path:
    path = next((p for kind in kinds_of(folder) if (p := folder_paths.get_full_path(kind, name))), None)
    if path is None:
        raise ZImageFileError(f"{name}: not found in models/{folder}. Put the file there and refresh the page "
                              "(press R in the canvas).")
    return Path(path)


def diffusers_folder_path(name: str) -> Path:
    """A model folder inside one of ComfyUI's diffusers folders (links resolved); nothing else, whatever the name
    says (older ComfyUI passes any string a client sends, such as `../../x` or an absolute path)."""
    for base in diffusers_bases():
        base = Path(base).resolve()
        candidate = (base / name).resolve()
        if candidate != base and candidate.is_relative_to(base) and candidate.is_dir():
            return candidate
    # The same words whether or not such a folder exists elsewhere, and no path that leads out: a refusal says
    # nothing about the disk.
    plain = not Path(name).is_absolute() and ".." not in Path(name).parts
    raise ZImageFileError(f"{'diffusers/' + name if plain else 'That diffusers choice'}: not a model folder in "
                          "models/diffusers. Choose a model from the list.")


def sharded_headers(folder: Path, what: str) -> list[SafetensorsHeader]:
    """All shards of one diffusers component, following its index file when there is one."""
    if not folder.is_dir():
        raise ZImageFileError(f"{folder.parent.name}: the diffusers folder has no {folder.name}/ subfolder; a Z-Image "
                              f"diffusers folder holds transformer/, text_encoder/ and vae/ ({what}).")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ZImageFileError(f"{indexes[0].name}: the shard index is unreadable ({e}).") from None
        files = sorted(set(weight_map.values()))
        outside = [f for f in files if not (folder / f).resolve().is_relative_to(folder.resolve())]
        if outside:
            raise ZImageFileError(f"{indexes[0].name}: it names a shard outside its folder ({outside[0]!r}); only files "
                                  "beside the index are read. The index is damaged or not from this model.")
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise ZImageFileError(f"{folder.parent.name}/{folder.name}: shard {missing[0]} named in {indexes[0].name} "
                                  "is missing; download the whole folder again.")
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in folder.iterdir() if p.is_file())
        hint = f" (found {', '.join(others[:3])}: only .safetensors weights are loaded)" if others else ""
        raise ZImageFileError(f"{folder.parent.name}/{folder.name}: no .safetensors files{hint}.")
    return [read_header(folder / f) for f in files]


def resolve_and_plan(model: str, text_encoder: str = AUTO, vae: str = AUTO, weight_dtype: str = "default",
                  compute_dtype: str = "default") -> tuple[Parts, LoadPlan]:
    """Find the three parts of a load and plan it, in one pass over their headers, before any weight is read. The
    diffusion model's config is inferred once; a text encoder or VAE looked for in a folder must pass the same checks
    (text_encoder_config, infer_vae_config) the plan then makes of the one chosen."""
    weight = dtype_choice("weight_dtype", weight_dtype, WEIGHT_DTYPES)
    compute = dtype_choice("compute_dtype", compute_dtype, COMPUTE_DTYPES)
    folder, _, name = model.partition("/")
    if folder not in SOURCE_FOLDERS or not name:
        raise ZImageFileError(f"{model}: choose a model from the list (diffusion_models/…, checkpoints/… or diffusers/…).")
    if folder == "diffusers":
        root = diffusers_folder_path(name)
        dit_headers = sharded_headers(root / "transformer", "the diffusion model")
        dit = dit_part(dit_headers, f"{model}/transformer")
        bundled_te = text_encoder_part(sharded_headers(root / "text_encoder", "the text encoder"),
                                       f"{model}/text_encoder") if text_encoder == AUTO else None
        bundled_vae = vae_part(sharded_headers(root / "vae", "the VAE"), f"{model}/vae") if vae == AUTO else None
        all_headers = dit_headers
    else:
        all_headers = [read_header(full_path(folder, name))]
        dit = dit_part(all_headers, model)
        bundled_te = text_encoder_part(all_headers, model)
        bundled_vae = vae_part(all_headers, model)
    if dit is None:
        keys = {k for h in all_headers for k in h.tensors}
        raise ZImageFileError(f"{model}: not a Z-Image diffusion model: it looks like {describe_foreign_layout(keys)}. "
                              "Pick a Z-Image file (e.g. z_image_turbo_bf16.safetensors).")
    dit_shapes = dit_comfy_shapes(dit)
    dit_config = infer_dit_config(dit_shapes, dit.label, dit.metadata)
    te = pick_part(text_encoder, "text_encoders", bundled_te, text_encoder_part, "text encoder", model,
                   lambda p: text_encoder_config(p, dit_config, dit.label))
    vae_p = pick_part(vae, "vae", bundled_vae, vae_part, "VAE", model,
                      lambda p: infer_vae_config(vae_ldm_shapes(p), p.label))
    parts = Parts(dit, te, vae_p, model)
    return parts, plan_load(parts, dit_config, dit_shapes, vae_ldm_shapes(vae_p), nextdit_takes_reference_latents(),
                            weight, compute, weight_dtype.endswith("_fast"))


def pick_part(choice, folder, bundled, finder, what, model, config_of) -> Part:
    """The part chosen, else the one bundled with the model, else the one file in the folder whose config the plan
    accepts (`config_of` raises ZImageFileError for one that does not fit)."""
    if choice != AUTO:
        part = finder([read_header(full_path(folder, choice))], f"{folder}/{choice}")
        if part is None:
            header = read_header(full_path(folder, choice))
            raise ZImageFileError(f"{folder}/{choice}: not a Z-Image {what}: it looks like "
                                  f"{describe_foreign_layout(header.tensors)}.")
        return part
    if bundled is not None:
        return bundled
    candidates = []
    for name in safetensors_files(folder):
        try:
            part = finder([read_header(full_path(folder, name))], f"{folder}/{name}")
            if part is not None:
                config_of(part)
                candidates.append(part)
        except ZImageFileError:
            continue
    if not candidates:
        raise ZImageFileError(f"{model} holds no {what}, and no file in models/{folder} fits it. Put the {what} "
                              f"there (qwen_3_4b.safetensors / ae.safetensors for real Z-Image) or pick one.")
    stem = Path(model).name.lower()
    # Several fit: prefer the one whose name shares the longest start with the model's (nano-* with nano-*).
    return max(candidates, key=lambda p: len(_common_prefix(Path(p.label).name.lower(), stem)))


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


# ---------------------------------------------------------------------------------------------------
# Shapes in ComfyUI's key layout, for the plan (a diffusers folder's are converted by core's own tables).

def comfy_layout_shapes(part: Part, convert) -> dict[str, tuple]:
    """A part's shapes as they are, or a diffusers part's through core's key conversion `convert`, run on `meta`."""
    if part.layout == "comfy":
        return part.shapes
    meta = {k: torch.empty(s, device="meta") for k, s in part.shapes.items()}
    return {k: tuple(v.shape) for k, v in convert(meta).items()}


def dit_comfy_shapes(part: Part) -> dict[str, tuple]:
    return comfy_layout_shapes(part, convert_diffusers_dit)


def plan_dit_config(part: Part) -> dict:
    """The diffusion model's config alone (for callers that load a diffusion model file by itself)."""
    return infer_dit_config(dit_comfy_shapes(part), part.label, part.metadata)


def vae_ldm_shapes(part: Part) -> dict[str, tuple]:
    return comfy_layout_shapes(part, diffusers_convert.convert_vae_state_dict)


# ---------------------------------------------------------------------------------------------------
# Reading tensors.

def read_part(part: Part, wanted: dict[str, torch.dtype | None], pbar=None) -> dict[str, torch.Tensor]:
    """Read the tensors of `part` whose key is in `wanted`, cast to the dtype given there (None: as stored).

    Each file is re-opened every ~chunk so memory-mapped pages already consumed are released.
    """
    total = max(part.nbytes, 1)
    chunk = max(16 << 20, min(256 << 20, total // 32))
    out: dict[str, torch.Tensor] = {}
    for header in part.headers:
        keys = [k for k in header.tensors if k.startswith(part.prefix) and k[len(part.prefix):] in wanted]
        i = 0
        while i < len(keys):
            mm.throw_exception_if_processing_interrupted()
            budget = 0
            try:
                with safe_open(str(header.path), framework="pt", device="cpu") as f:
                    while i < len(keys) and (budget == 0 or budget < chunk):
                        key = keys[i]
                        target = key[len(part.prefix):]
                        tensor = f.get_tensor(key)
                        dtype = wanted[target]
                        if dtype is not None and tensor.dtype != dtype and tensor.is_floating_point():
                            tensor = tensor.to(dtype)
                        out[target] = tensor
                        budget += header.tensors[key].nbytes
                        i += 1
            except (SafetensorError, OSError, RuntimeError) as e:  # damaged data past a sound header
                raise ZImageFileError(f"{header.path.name}: reading tensor {keys[i]!r} failed ({e}); the file is "
                                      "corrupt. Download it again.") from None
            if pbar is not None:
                pbar.update(budget)
    return out


def assign_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], label: str) -> None:
    """Put the file tensors into a module built on `meta`; fail clearly if anything is left unset."""
    for layer in module.modules():
        # Core's mixed-precision layers move each weight they load (with its scales) to the device they were built
        # on, which here is `meta`: let them keep the file tensors where they are instead.
        kwargs = getattr(layer, "factory_kwargs", None)
        if isinstance(kwargs, dict) and kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "meta":
            kwargs["device"] = None
    try:
        module.load_state_dict(tensors, strict=False, assign=True)
    except ValueError as e:  # core's quantised layers refuse a layer they cannot build
        raise ZImageFileError(f"{label}: a quantised layer does not load ({e}); the file is incomplete or damaged. "
                              "Download it again, or use the bf16 file.") from None
    # Scaled-fp8 layers a file leaves unscaled keep ComfyUI's default scale of 1, as core's loading does;
    # NextDiT's norm_final is never used in its forward pass and the released files do not carry it.
    # (Set one by one: a second load_state_dict would make mixed-precision layers drop what they just loaded.)
    for name, tensor in list(module.named_parameters()):
        if tensor.is_meta and (name.endswith((".scale_weight", ".scale_input")) or name == "norm_final.weight"):
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr,
                    torch.nn.Parameter(torch.ones(tensor.shape, dtype=torch.float32), requires_grad=False))
    unset = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    # A mixed-precision layer whose weight is not in the file is left without one.
    unset += [f"{n}.weight" for n, m in module.named_modules()
              if hasattr(m, "factory_kwargs") and hasattr(m, "in_features") and getattr(m, "weight", None) is None]
    if unset:
        raise ZImageFileError(f"{label}: the file lacks {len(unset)} tensors the model needs (e.g. {unset[0]}); it is "
                              "incomplete or a different model size than its other tensors imply.")


def target_dtypes(module: torch.nn.Module) -> dict[str, torch.dtype]:
    """The dtype of every parameter and buffer the module holds before loading. (Core's mixed-precision layers hold
    no weight until they load one, in the dtype its quantisation config gives; their weights are not listed.)"""
    return {k: v.dtype for k, v in list(module.named_parameters()) + list(module.named_buffers())}


def read_quantized(part: Part, pbar) -> tuple[dict[str, torch.Tensor], Quantization | None]:
    """Every tensor of a part in one of ComfyUI's quantised layouts, as stored and brought into the layout the running
    ComfyUI loads, and how it loads it. Read before the model is built: its layers depend on the layout."""
    if part.layout != "comfy":
        raise ZImageFileError(f"{part.label}: quantised weights in a diffusers folder are not supported; use the "
                              "ComfyUI-format file (e.g. z_image_turbo_fp8_scaled.safetensors) or the bf16 folder.")
    sd = read_part(part, {k: None for k in part.shapes}, pbar)
    try:
        sd, quant = prepare_quantized(sd, part.metadata)
    except (ValueError, KeyError) as e:  # e.g. a `comfy_quant` config that is not JSON
        raise ZImageFileError(f"{part.label}: its quantisation settings are unreadable ({e}); the file is damaged. "
                              "Download it again, or use the bf16 file.") from None
    unknown = quant.formats - quant_formats() if quant is not None and quant.mixed_precision else set()
    if unknown:
        raise ZImageFileError(f"{part.label}: its layers are quantised as {', '.join(sorted(map(str, unknown)))}, which "
                              f"this ComfyUI cannot load (it loads {', '.join(sorted(quant_formats()))}). Update "
                              "ComfyUI, or use the bf16 or fp8_scaled file.")
    return sd, quant


def cast_to(tensors: dict[str, torch.Tensor], wanted: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """Cast the tensors a module holds in a known dtype to it; quantised weights and their scales stay as stored
    (core's layers convert them as they load them)."""
    return {k: v.to(wanted[k]) if k in wanted and v.is_floating_point() and v.dtype != wanted[k] else v
            for k, v in tensors.items()}


# ---------------------------------------------------------------------------------------------------
# Diffusion model.

def convert_diffusers_dit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ZImageTransformer2DModel keys -> ComfyUI NextDiT keys (ComfyUI's own LoRA key table)."""
    config = {"dim": sd["cap_embedder.1.weight"].shape[0],
              "n_layers": comfy.model_detection.count_blocks(sd.keys(), "layers.{}."),
              "n_refiner_layers": comfy.model_detection.count_blocks(sd.keys(), "noise_refiner.{}.")}
    key_map = comfy.utils.z_image_to_diffusers(config)
    out, fused = {}, {}
    for k, v in sd.items():
        target = key_map.get(k, k)
        if isinstance(target, tuple):  # q/k/v rows of the fused qkv projection
            name, (dim, offset, _) = target
            fused.setdefault(name, []).append((offset, v))
        else:
            out[target] = v
    for name, pieces in fused.items():
        out[name] = torch.cat([v for _, v in sorted(pieces, key=lambda p: p[0])], dim=0)
    return out


def load_diffusion_model(part: Part, unet_config: dict, weight_dtype, compute_dtype, fp8_fast: bool, pbar,
                         reference_images: bool = False):
    model_config = comfy.supported_models.ZImage(dict(unet_config))
    quantized, quant = None, None
    if is_quantized(part.shapes, part.metadata):
        quantized, quant = read_quantized(part, pbar)
        if quant is not None:
            apply_quantization(model_config, quant, part.label)

    load_device = mm.get_torch_device()
    parameters = sum(math.prod(s) for s in part.shapes.values())
    file_dtype = TORCH_DTYPES.get(most_common_dtype(part.dtypes), torch.float32)
    supported = list(model_config.supported_inference_dtypes)
    # As core's loading: the weight dtype of a quantised file is chosen for the device, not taken from the file, and
    # mixed-precision layers compute in the dtype chosen for no weight dtype at all.
    if weight_dtype is None:
        weight_dtype = mm.unet_dtype(model_params=parameters, supported_dtypes=supported,
                                     weight_dtype=None if quant is not None else file_dtype)
    if compute_dtype is None:
        mixed = quant is not None and quant.mixed_precision
        compute_dtype = mm.unet_manual_cast(None if mixed else weight_dtype, load_device, supported)
    model_config.set_inference_dtype(weight_dtype, compute_dtype)
    if fp8_fast:
        model_config.optimizations["fp8"] = True

    if reference_images:  # edit models take the input image from core's ReferenceLatent conditioning
        model = ZImageEditModel(model_config, device=torch.device("meta"))
    else:
        model = model_config.get_model({}, "", device=torch.device("meta"))
    wanted = target_dtypes(model.diffusion_model)
    if quantized is not None:
        tensors = cast_to(quantized, wanted)
        del quantized
    elif part.layout == "diffusers":
        raw = read_part(part, {k: None for k in part.shapes}, pbar)
        tensors = {k: v.to(wanted[k]) if k in wanted and v.is_floating_point() else v
                   for k, v in convert_diffusers_dit(raw).items()}
        del raw
    else:
        refuse_unplaced(part, wanted)
        tensors = read_part(part, wanted, pbar)
    assign_weights(model.diffusion_model, tensors, part.label)
    del tensors
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())
    add_interrupt_checks(model.diffusion_model)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, GUARD_KEY, guard_model_call)
    patcher.set_model_sampler_post_cfg_function(check_cfg)
    return patcher


def refuse_unplaced(part: Part, wanted) -> None:
    """Load strictly: a tensor of the file that the model has no place for would be dropped without a word (a
    newer Z-Image variant's weights, say), so it stops the load instead."""
    unplaced = sorted(set(part.shapes) - set(wanted) - {"norm_final.weight"})
    if unplaced:
        raise ZImageFileError(f"{part.label}: {len(unplaced)} of its tensors have no place in the Z-Image model this "
                              f"ComfyUI builds (e.g. {unplaced[0]}): it is another variant or a newer layout. Update "
                              "ComfyUI and this plugin, or pick a Z-Image Turbo/Base file.")


# ---------------------------------------------------------------------------------------------------
# Text encoder: ComfyUI's Qwen3 and Z-Image tokenizer/template, sized from the file.

def text_encoder_class(config: dict, llama_dtype=None, llama_options: dict | None = None):
    """A ZImageTEModel whose Qwen3 has the file's sizes; identical to core's for the real 4B encoder. As core's
    `z_image.te(...)`, it computes in the file's dtype and takes `llama_options` (how core loads a quantised
    file) into its model options."""
    model_class = qwen3_model_class(config)

    class SizedQwen3Model(sd1_clip.SDClipModel):
        def __init__(self, device="cpu", layer="hidden", layer_idx=-2, dtype=None, attention_mask=True, model_options={}):
            super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config={}, dtype=dtype,
                             special_tokens={"pad": 151643}, layer_norm_hidden_state=False, model_class=model_class,
                             enable_attention_masks=attention_mask, return_attention_masks=attention_mask,
                             model_options=model_options)

    class SizedZImageTE(z_image.ZImageTEModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            if llama_dtype is not None:
                dtype = llama_dtype
            if llama_options:
                model_options = {**model_options, **llama_options}
            sd1_clip.SD1ClipModel.__init__(self, device=device, dtype=dtype, name="qwen3_4b",
                                           clip_model=SizedQwen3Model, model_options=model_options)
    return SizedZImageTE


def load_text_encoder(part: Part, config: dict, pbar):
    llama_dtype = TORCH_DTYPES.get(part.dtypes.get("model.norm.weight"))  # the same rule as core's llama_detect
    quantized, quant = read_quantized(part, pbar) if is_quantized(part.shapes, part.metadata) else (None, None)
    target = type("ClipTarget", (), {})()
    target.params = {}
    target.clip = text_encoder_class(config, llama_dtype, quant.text_encoder_options if quant is not None else None)
    target.tokenizer = z_image.ZImageTokenizer
    parameters = sum(math.prod(s) for s in part.shapes.values())
    clip = comfy.sd.CLIP(target, embedding_directory=folder_paths.get_folder_paths("embeddings"), parameters=parameters,
                         model_options={"initial_device": torch.device("meta")})
    transformer = clip.cond_stage_model.qwen3_4b.transformer
    wanted = target_dtypes(transformer)
    tensors = cast_to(quantized, wanted) if quantized is not None else read_part(part, wanted, pbar)
    del quantized
    assign_weights(transformer, tensors, part.label)
    return clip


# ---------------------------------------------------------------------------------------------------
# VAE.

def load_vae(part: Part, ddconfig: dict, pbar):
    sd = read_part(part, {k: None for k in part.shapes}, pbar)
    if part.layout == "diffusers":
        sd = diffusers_convert.convert_vae_state_dict(sd)
    z = ddconfig["z_channels"]
    # Flux's VAE has no quant convs; identity 1x1 convs make ComfyUI's AutoencoderKL exactly equivalent.
    if "quant_conv.weight" not in sd:
        sd["quant_conv.weight"] = torch.eye(2 * z)[:, :, None, None]
        sd["quant_conv.bias"] = torch.zeros(2 * z)
    if "post_quant_conv.weight" not in sd:
        sd["post_quant_conv.weight"] = torch.eye(z)[:, :, None, None]
        sd["post_quant_conv.bias"] = torch.zeros(z)
    with torch.device("meta"):
        reference = AutoencoderKL(ddconfig=ddconfig, embed_dim=z)
    expected = set(reference.state_dict())
    unplaced = sorted(set(sd) - expected)
    if unplaced:
        raise ZImageFileError(f"{part.label}: {len(unplaced)} of its tensors have no place in the VAE its other tensors "
                              f"describe (e.g. {unplaced[0]}): the file is damaged or another model's VAE. Use the "
                              "Flux VAE (ae.safetensors) that Z-Image uses.")
    missing = sorted(expected - set(sd))
    if missing:
        raise ZImageFileError(f"{part.label}: the VAE lacks {len(missing)} tensors its other tensors imply (e.g. "
                              f"{missing[0]}); the file is incomplete. Download it again.")
    try:
        vae = comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": ddconfig, "embed_dim": z}})
    except RuntimeError as e:  # shape mismatch inside load_state_dict
        raise ZImageFileError(f"{part.label}: the VAE tensors do not fit together ({str(e).splitlines()[0]}).") from None
    vae.latent_channels = z
    guard_vae(vae.first_stage_model)
    return vae


NODES = [ZImageCheckpointLoader]  # what this module adds to ComfyUI
