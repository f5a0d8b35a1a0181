"""Z-Image Entropy-Pruned Attention: a model patch that skips the attention heads that carry little.

For the first `calibration_steps` sampling steps attention runs in full while, for every layer and head,
the normalised entropy H/log(N) of its attention is measured on an evenly spaced sample of queries. Then
the heads whose attention is most spread out are pruned: a head whose every query averages over the whole
sequence adds an almost position-independent term, which changes little from step to step. For a pruned
head the q/k/v rows of the fused `qkv` projection, its attention and its columns of the `out` projection
are not computed at all; its contribution becomes the one it made at the last calibration step (`reuse`)
or nothing (`zero`).

The patch replaces each JointAttention's `forward` through ModelPatcher object patches on a clone, and
tracks the sampling step with keyed wrappers (OUTER_SAMPLE resets a run, DIFFUSION_MODEL tells the phase
from the sigma), so the input model is untouched and every core sampler works. While calibrating, and in
layers where nothing is pruned, the computation is JointAttention's own, so pruning nothing reproduces the
unpatched model exactly.
"""
from __future__ import annotations

import json
import logging
import math
import uuid
import weakref
from dataclasses import dataclass, field

import comfy.ldm.modules.attention as comfy_attention
import comfy.ops
import comfy.patcher_extension
import torch
import torch.nn.functional as F
from comfy.ldm.flux.math import apply_rope
from comfy.ldm.lumina.model import JointAttention, NextDiT
from comfy_api.latest import io

from .shared import ZImageError

log = logging.getLogger("comfyui-zimage")

WRAPPER_KEY = "zimage_entropy_pruning"
SESSION_KEY = "zimage_pruning_session"  # transformer_options: id of the run state (a string survives deepcopy)
PHASE_KEY = "zimage_pruning_phase"
CALIBRATE, PRUNE, FULL = "calibrate", "prune", "full"
RULES = ("keep_ratio", "threshold")
PRUNED_OUTPUT = ("reuse", "zero")
DEFAULT_BACKEND = "comfy default"
ENTROPY_CHUNK_ELEMENTS = 1 << 25  # logits held at once while measuring entropy (128 MiB in fp32)


class PruningError(ZImageError):
    """A model or option the patch cannot use, with a message that says what is wrong and how to fix it."""


# ---------------------------------------------------------------------------------------------------
# Nodes.

def attention_backends() -> list[str]:
    """The attention functions this ComfyUI has (xformers and sage only when installed)."""
    return [DEFAULT_BACKEND] + sorted(comfy_attention.REGISTERED_ATTENTION_FUNCTIONS)


class ZImageEntropyPrunedAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageEntropyPrunedAttention",
            display_name="Z-Image Entropy-Pruned Attention",
            category="Z-Image/model patches",
            description="Measures every attention head's entropy during the first sampling steps, then skips the "
                        "heads whose attention is most spread out (their projections and attention are not "
                        "computed). Also picks the attention backend for this model without a restart.",
            inputs=[
                io.Model.Input("model", tooltip="A Z-Image (NextDiT) model. The input model is not changed."),
                io.Int.Input("calibration_steps", default=2, min=1, max=1000,
                             tooltip="Steps run in full at the start of sampling while head entropies are measured. "
                                     "More steps: steadier decisions and better cached outputs, less saving. If it "
                                     "is not below the sampling steps, nothing is pruned (the report says so)."),
                io.Combo.Input("rule", options=list(RULES), default="keep_ratio",
                               tooltip="keep_ratio: keep that fraction of all heads, the lowest-entropy ones. "
                                       "threshold: prune every head whose normalised entropy is above the threshold."),
                io.Float.Input("keep_ratio", default=0.75, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of heads kept (rule keep_ratio). 1.0 prunes nothing."),
                io.Float.Input("threshold", default=0.9, min=0.0, max=1.0, step=0.01,
                               tooltip="Normalised entropy H/log(N) above which a head is pruned (rule threshold); "
                                       "1.0 means a perfectly uniform attention."),
                io.Int.Input("min_heads_per_layer", default=1, min=0, max=1024,
                             tooltip="Each layer keeps at least this many heads, its lowest-entropy ones."),
                io.Combo.Input("pruned_heads", options=list(PRUNED_OUTPUT), default="reuse",
                               tooltip="What replaces a pruned head's output. reuse: its output at the last "
                                       "calibration step (closer to the full model; holds one attention output "
                                       "per layer in memory). zero: nothing (no memory)."),
                io.Int.Input("sample_queries", default=256, min=8, max=65536,
                             tooltip="Queries per head whose attention entropy is measured (evenly spaced over the "
                                     "sequence). The measurement never holds the full N x N attention."),
                io.Combo.Input("attention_backend", options=attention_backends(), default=DEFAULT_BACKEND,
                               tooltip="Attention function for this model's (kept) heads, chosen per run without "
                                       "restarting ComfyUI. 'comfy default' is what ComfyUI was started with."),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, model, calibration_steps, rule, keep_ratio, threshold, min_heads_per_layer, pruned_heads,
                sample_queries=256, attention_backend=DEFAULT_BACKEND) -> io.NodeOutput:
        config = PruneConfig(calibration_steps, rule, keep_ratio, threshold, min_heads_per_layer, pruned_heads,
                             sample_queries, attention_backend)
        return io.NodeOutput(patch_model(model, config))


class ZImagePruningReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImagePruningReport",
            display_name="Z-Image Pruning Report",
            category="Z-Image/model patches",
            description="Shows which heads the entropy-pruned attention skipped in the last sampling run and the "
                        "fraction of attention FLOPs removed.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of Z-Image Entropy-Pruned Attention."),
                io.Latent.Input("samples", tooltip="The sampler's output, so the report is made after sampling."),
            ],
            outputs=[io.String.Output(display_name="report", tooltip="The report as JSON.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, samples) -> io.NodeOutput:
        state = state_of(model)
        if state is None:
            raise PruningError("This model has no entropy-pruned attention patch. Connect the MODEL output of "
                               "Z-Image Entropy-Pruned Attention.")
        report = state.report()
        text = json.dumps(report, ensure_ascii=False)
        return io.NodeOutput(text, ui={"text": [summary_line(report)]})


def summary_line(report: dict) -> str:
    if not report.get("measured"):
        return "Nothing measured yet: " + "; ".join(report.get("warnings") or ["sample with this model first"])
    line = (f"pruned {report['heads_pruned']}/{report['heads_total']} heads, "
            f"{100 * report['attention_flops_removed']:.1f}% of attention FLOPs removed")
    if report.get("warnings"):
        line += " (" + "; ".join(report["warnings"]) + ")"
    return line


# ---------------------------------------------------------------------------------------------------
# Patching.

@dataclass
class PruneConfig:
    calibration_steps: int = 2
    rule: str = "keep_ratio"
    keep_ratio: float = 0.75
    threshold: float = 0.9
    min_heads_per_layer: int = 1
    pruned_heads: str = "reuse"
    sample_queries: int = 256
    attention_backend: str = DEFAULT_BACKEND

    def validate(self) -> None:
        if self.rule not in RULES:
            raise PruningError(f"rule {self.rule!r} is not one of {', '.join(RULES)}.")
        for name in ("keep_ratio", "threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0 or math.isnan(value):
                raise PruningError(f"{name} {value} is outside [0, 1]; choose a value from 0 to 1.")
        if self.pruned_heads not in PRUNED_OUTPUT:
            raise PruningError(f"pruned_heads {self.pruned_heads!r} is not one of {', '.join(PRUNED_OUTPUT)}.")
        if self.calibration_steps < 1:
            raise PruningError("calibration_steps must be at least 1: head entropies are measured on those steps.")
        if self.attention_backend not in attention_backends():
            raise PruningError(f"attention backend {self.attention_backend!r} is not available in this ComfyUI; "
                               f"available: {', '.join(attention_backends())}.")


# Live run states, by id; the object patches hold the state, so it lives exactly as long as the model clone.
_STATES: weakref.WeakValueDictionary[str, PruneState] = weakref.WeakValueDictionary()


def patch_model(model, config: PruneConfig):
    """A clone of `model` whose NextDiT attention prunes heads as `config` says."""
    config.validate()
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(diffusion_model, NextDiT):
        kind = type(diffusion_model).__name__ if diffusion_model is not None else type(model).__name__
        raise PruningError(f"This model's network is {kind}, not a Z-Image / Lumina NextDiT; entropy-pruned attention "
                           "only patches NextDiT attention. Load a Z-Image model (Z-Image Checkpoint Loader).")
    m = model.clone()
    state = PruneState(config, model_dim=diffusion_model.dim)
    for name, module in diffusion_model.named_modules():
        if isinstance(module, JointAttention):
            state.layers[name] = LayerState(name, module.n_local_heads, module.head_dim,
                                            prunable=module.n_local_heads == module.n_local_kv_heads)
            m.add_object_patch(f"diffusion_model.{name}.forward", AttentionForward(module, state, name))
    _STATES[state.id] = state
    options = m.model_options.setdefault("transformer_options", {})
    options[SESSION_KEY] = state.id
    if config.attention_backend != DEFAULT_BACKEND:
        options["optimized_attention_override"] = backend_override(config.attention_backend)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, state.outer_sample_wrapper)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, state.diffusion_model_wrapper)
    return m


def state_of(model) -> PruneState | None:
    session = model.model_options.get("transformer_options", {}).get(SESSION_KEY)
    return _STATES.get(session) if session else None


def backend_override(name: str):
    function = comfy_attention.get_attention_function(name)

    def override(default_function, *args, **kwargs):
        return function(*args, **kwargs)  # kwargs carry _inside_attn_wrapper, so this does not recurse

    return override


class AttentionForward:
    """JointAttention.forward for one module, with calibration and pruning (an object patch)."""

    def __init__(self, module: JointAttention, state: PruneState, name: str):
        self.module, self.state, self.name = module, state, name

    def __call__(self, x, x_mask, freqs_cis, transformer_options={}, **fused):  # noqa: B006 - JointAttention's signature
        if fused:  # newer core's fused quantised block hands over its own qkv projection: run core's attention as is
            return JointAttention.forward(self.module, x, x_mask, freqs_cis, transformer_options=transformer_options, **fused)
        phase = transformer_options.get(PHASE_KEY, FULL)
        layer = self.state.layers[self.name]
        layer.tokens = x.shape[1]
        if phase == PRUNE and layer.pruned:
            return forward_kept_heads(self.module, layer, self.state, x, x_mask, freqs_cis, transformer_options)
        if phase != CALIBRATE:
            return JointAttention.forward(self.module, x, x_mask, freqs_cis, transformer_options=transformer_options)
        q, k, v = project(self.module, x, freqs_cis)
        output = comfy_attention.optimized_attention_masked(q, k, v, self.module.n_local_heads, x_mask, skip_reshape=True,
                                                            transformer_options=transformer_options)
        layer.add_entropy(attention_entropy(q, k, x_mask, self.state.config.sample_queries))
        if self.state.config.pruned_heads == "reuse":
            layer.last_output[batch_key(transformer_options, output)] = output.detach()
        return self.module.out(output)


def project(module: JointAttention, x, freqs_cis):
    """JointAttention's q, k, v, as (B, heads, N, head_dim), computed as it computes them."""
    bsz, seqlen, _ = x.shape
    xq, xk, xv = torch.split(module.qkv(x), [module.n_local_heads * module.head_dim,
                                             module.n_local_kv_heads * module.head_dim,
                                             module.n_local_kv_heads * module.head_dim], dim=-1)
    xq = module.q_norm(xq.view(bsz, seqlen, module.n_local_heads, module.head_dim))
    xk = module.k_norm(xk.view(bsz, seqlen, module.n_local_kv_heads, module.head_dim))
    xv = xv.view(bsz, seqlen, module.n_local_kv_heads, module.head_dim)
    xq, xk = apply_rope(xq, xk, freqs_cis)
    n_rep = module.n_local_heads // module.n_local_kv_heads
    if n_rep >= 1:
        xk = xk.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
        xv = xv.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
    return xq.movedim(1, 2), xk.movedim(1, 2), xv.movedim(1, 2)


def forward_kept_heads(module: JointAttention, layer: LayerState, state: PruneState, x, x_mask, freqs_cis,
                       transformer_options):
    """Attention over the kept heads only: their qkv rows, their attention, their out columns."""
    bsz, seqlen, _ = x.shape
    hd, kept = module.head_dim, len(layer.keep)
    if kept == 0:  # every head pruned (min_heads_per_layer 0): no attention at all in this layer
        weight, bias = effective_weight(module.out, x)
        y = x.new_zeros(bsz, seqlen, weight.shape[0]) if bias is None else bias.expand(bsz, seqlen, -1).clone()
        return add_reused(y, module, layer, state, transformer_options)
    weight, bias = effective_weight(module.qkv, x)
    rows = layer.qkv_rows(weight.device)
    qkv = F.linear(x, weight.index_select(0, rows), None if bias is None else bias.index_select(0, rows))
    xq, xk, xv = qkv.view(bsz, seqlen, 3, kept, hd).unbind(2)
    xq, xk = apply_rope(module.q_norm(xq), module.k_norm(xk), freqs_cis)
    mask = x_mask
    if mask is not None and mask.ndim == 4 and mask.shape[1] == module.n_local_heads:
        mask = mask.index_select(1, layer.keep_index(mask.device))
    output = comfy_attention.optimized_attention_masked(xq.movedim(1, 2), xk.movedim(1, 2), xv.movedim(1, 2), kept, mask,
                                                        skip_reshape=True, transformer_options=transformer_options)
    weight, bias = effective_weight(module.out, output)
    y = F.linear(output, weight.index_select(1, layer.out_columns(weight.device)), bias)
    return add_reused(y, module, layer, state, transformer_options)


def add_reused(y, module: JointAttention, layer: LayerState, state: PruneState, transformer_options):
    if state.config.pruned_heads == "reuse":
        extra = layer.reused_contribution(batch_key(transformer_options, y), module)
        if extra is not None:
            y = y + extra
    return y


def effective_weight(linear, x) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias a Linear really computes with: cast to the input's dtype and device, with LoRA and
    other weight patches applied (ComfyUI ops apply some of them lazily) and fp8 scales folded in."""
    if isinstance(linear, comfy.ops.CastWeightBiasOp):
        weight, bias = comfy.ops.cast_bias_weight(linear, x)
        scale = getattr(linear, "scale_weight", None)
        if scale is not None:
            weight = weight * scale.to(device=weight.device, dtype=weight.dtype)
        return weight, bias
    return linear.weight.to(x), None if linear.bias is None else linear.bias.to(x)


def batch_key(transformer_options, tensor) -> tuple:
    """Which batch a call carries (cond/uncond layout and shape): a reused output must come from the same."""
    return tuple(transformer_options.get("cond_or_uncond", ())), tuple(tensor.shape[:2])


# ---------------------------------------------------------------------------------------------------
# Entropy.

def attention_entropy(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, queries: int) -> torch.Tensor:
    """Mean normalised attention entropy H/log(N_valid) per head, (heads,), over the batch and an evenly spaced
    sample of queries; logits are computed a few heads at a time, never the whole N x N matrix.

    q, k: (B, heads, N, head_dim) as attention receives them; mask as ComfyUI's attention takes it (bool:
    True attends; float: added to the logits)."""
    b, heads, n, d = q.shape
    index = torch.linspace(0, n - 1, min(queries, n), device=q.device).round().long().unique()
    qs = q.index_select(2, index).float() * d ** -0.5
    bias = mask_bias(mask, index, n)
    if bias is not None:
        valid = torch.isfinite(bias) & (bias > -1e4)
        log_n = valid.sum(-1).clamp_min(2).float().log()  # (B or 1, 1 or heads, S)
    else:
        log_n = torch.full((1, 1, 1), math.log(max(n, 2)), device=q.device)
    per_chunk = max(1, ENTROPY_CHUNK_ELEMENTS // max(1, b * len(index) * n))
    out = torch.empty(heads, dtype=torch.float32, device=q.device)
    for h0 in range(0, heads, per_chunk):
        h1 = min(heads, h0 + per_chunk)
        logits = qs[:, h0:h1] @ k[:, h0:h1].float().transpose(-1, -2)
        if bias is not None:
            logits = logits + (bias if bias.shape[1] == 1 else bias[:, h0:h1])
        logp = torch.log_softmax(logits, dim=-1)
        entropy = -(logp.exp() * logp).nan_to_num(0.0).sum(-1)  # masked keys: 0 * -inf -> 0
        ln = log_n if log_n.shape[1] == 1 else log_n[:, h0:h1]
        out[h0:h1] = (entropy / ln).mean(dim=(0, 2))
    return out


def mask_bias(mask: torch.Tensor | None, query_index: torch.Tensor, n: int) -> torch.Tensor | None:
    """The mask as an additive float bias shaped (B or 1, heads or 1, sampled queries, N), read the way
    ComfyUI's attention broadcasts it ((N,) -> keys; (B, N) and (Nq, N) follow attention_pytorch)."""
    if mask is None:
        return None
    m = mask
    if m.ndim == 1:
        m = m[None, None, None]
    if m.ndim == 2:
        m = m[None]
    if m.ndim == 3:
        m = m[:, None]
    if m.shape[-2] > 1:
        m = m.index_select(-2, query_index.to(m.device))
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, device=m.device).masked_fill(~m, float("-inf"))
    return m.float()


# ---------------------------------------------------------------------------------------------------
# Run state: entropies, decisions, reused outputs, the report.

@dataclass
class LayerState:
    name: str
    heads: int
    head_dim: int
    prunable: bool = True
    entropy_sum: torch.Tensor | None = None
    calls: int = 0
    keep: list[int] = field(default_factory=list)
    pruned: list[int] = field(default_factory=list)
    tokens: int = 0
    last_output: dict = field(default_factory=dict)  # batch key -> attention output (B, N, heads*hd), pre-`out`
    contribution: dict = field(default_factory=dict)  # batch key -> pruned heads' reused term (B, N, dim)
    _index_cache: dict = field(default_factory=dict)

    def add_entropy(self, entropy: torch.Tensor) -> None:
        # summed where it was measured: a copy to the CPU here would make every calibrating layer wait for the GPU
        entropy = entropy.detach().double()
        self.entropy_sum = entropy if self.entropy_sum is None else self.entropy_sum + entropy.to(self.entropy_sum.device)
        self.calls += 1

    @property
    def entropy(self) -> list[float] | None:
        return None if self.entropy_sum is None else (self.entropy_sum / self.calls).cpu().tolist()

    def reset(self) -> None:
        self.entropy_sum, self.calls, self.keep, self.pruned = None, 0, [], []
        self.last_output.clear()
        self.contribution.clear()
        self._index_cache.clear()

    def _index(self, kind: str, device) -> torch.Tensor:
        key = (kind, str(device))
        if key not in self._index_cache:
            hd, heads = self.head_dim, self.heads
            if kind == "heads":
                values = self.keep
            elif kind == "qkv":  # q rows, then k rows, then v rows of the kept heads
                values = [part * heads * hd + h * hd + i for part in range(3) for h in self.keep for i in range(hd)]
            elif kind == "out":
                values = [h * hd + i for h in self.keep for i in range(hd)]
            else:  # "pruned": columns of the pruned heads
                values = [h * hd + i for h in self.pruned for i in range(hd)]
            self._index_cache[key] = torch.tensor(values, dtype=torch.long, device=device)
        return self._index_cache[key]

    def keep_index(self, device) -> torch.Tensor:
        return self._index("heads", device)

    def qkv_rows(self, device) -> torch.Tensor:
        return self._index("qkv", device)

    def out_columns(self, device) -> torch.Tensor:
        return self._index("out", device)

    def reused_contribution(self, key, module: JointAttention) -> torch.Tensor | None:
        """The pruned heads' output at the last calibration step, through their `out` columns (once per batch key)."""
        if key not in self.contribution:
            cached = self.last_output.pop(key, None)
            if cached is None:
                return None
            weight, _ = effective_weight(module.out, cached)
            cols = self._index("pruned", weight.device)
            self.contribution[key] = F.linear(cached.index_select(-1, cols), weight.index_select(1, cols))
        return self.contribution[key]

    def attention_flops(self, heads: int, dim: int) -> float:
        """FLOPs of `heads` heads at the last token count: qkv rows and out columns, QK^T and PV."""
        n = self.tokens
        return heads * (8.0 * n * dim * self.head_dim + 4.0 * n * n * self.head_dim)


class PruneState:
    """One patched model's calibration, decisions and report, reset at the start of every sampling run."""

    def __init__(self, config: PruneConfig, model_dim: int):
        self.id = uuid.uuid4().hex
        self.config = config
        self.model_dim = model_dim
        self.layers: dict[str, LayerState] = {}
        self.decided = False
        self.warnings: list[str] = []

    def reset(self) -> None:
        for layer in self.layers.values():
            layer.reset()
        self.decided = False
        self.warnings = []

    # Wrappers (keyed, so they stack with other patches and leave with the clone).

    def outer_sample_wrapper(self, executor, *args, **kwargs):
        self.reset()
        return executor(*args, **kwargs)

    def diffusion_model_wrapper(self, executor, *args, **kwargs):
        options = dict(kwargs.get("transformer_options", {}))
        options[PHASE_KEY] = self.phase(options)
        if options[PHASE_KEY] == PRUNE and not self.decided:
            self.decide()
        kwargs["transformer_options"] = options
        return executor(*args, **kwargs)

    def phase(self, options: dict) -> str:
        sigmas, sigma = options.get("sample_sigmas"), options.get("sigmas")
        if sigmas is None or sigma is None:
            return FULL  # called outside a sampler: behave as the unpatched model
        steps = len(sigmas) - 1
        k = self.config.calibration_steps
        if k >= steps:
            message = (f"calibration_steps {k} is not below the {steps} sampling steps: calibrated on all of them and "
                       "pruned nothing; lower calibration_steps to prune")
            if message not in self.warnings:
                self.warnings.append(message)
                log.warning("Z-Image entropy pruning: %s", message)
            return CALIBRATE
        boundary = float(sigmas[k])
        return CALIBRATE if float(sigma.max()) > boundary * (1 + 1e-6) + 1e-9 else PRUNE

    def decide(self) -> None:
        """Choose the kept heads of every layer from the measured entropies."""
        self.decided = True
        measured = [layer for layer in self.layers.values() if layer.entropy_sum is not None]
        if not measured:
            self.warnings.append("no attention entropy was measured; nothing pruned")
            return
        c = self.config
        entropy = {layer.name: layer.entropy for layer in measured}  # one read of each layer's sums
        candidates = [(e, layer.name, h) for layer in measured if layer.prunable for h, e in enumerate(entropy[layer.name])]
        if c.rule == "keep_ratio":
            total = sum(layer.heads for layer in measured if layer.prunable)
            n_keep = math.ceil(c.keep_ratio * total - 1e-9)
            kept = {(name, h) for _, name, h in sorted(candidates)[:n_keep]}
        else:
            kept = {(name, h) for e, name, h in candidates if e <= c.threshold}
        for layer in measured:
            if not layer.prunable:
                layer.keep, layer.pruned = list(range(layer.heads)), []
                continue
            order = sorted(range(layer.heads), key=lambda h, e=entropy[layer.name]: e[h])
            keep = {h for h in range(layer.heads) if (layer.name, h) in kept}
            for h in order[:min(c.min_heads_per_layer, layer.heads)]:
                keep.add(h)
            layer.keep = sorted(keep)
            layer.pruned = [h for h in range(layer.heads) if h not in keep]
            if not layer.pruned:
                layer.last_output.clear()
        report = self.report()
        log.info("Z-Image entropy pruning: %s", summary_line(report))

    def report(self) -> dict:
        layers = list(self.layers.values())
        total = sum(layer.attention_flops(layer.heads, self.model_dim) for layer in layers)
        removed = sum(layer.attention_flops(len(layer.pruned), self.model_dim) for layer in layers)
        c = self.config
        return {
            "measured": any(layer.entropy_sum is not None for layer in layers), "decided": self.decided,
            "rule": c.rule, "keep_ratio": c.keep_ratio, "threshold": c.threshold,
            "calibration_steps": c.calibration_steps, "min_heads_per_layer": c.min_heads_per_layer,
            "pruned_heads": c.pruned_heads, "attention_backend": c.attention_backend,
            "heads_total": sum(layer.heads for layer in layers),
            "heads_pruned": sum(len(layer.pruned) for layer in layers),
            "attention_flops_removed": round(removed / total, 4) if total else 0.0,
            "layers": [{"layer": layer.name, "tokens": layer.tokens, "pruned": layer.pruned,
                        "entropy": [round(e, 4) for e in layer.entropy] if layer.entropy_sum is not None else None}
                       for layer in layers],
            "warnings": list(self.warnings),
        }


NODES = [ZImageEntropyPrunedAttention, ZImagePruningReport]  # what this module adds to ComfyUI
