"""Z-Image Entropy-Pruned Attention: a model patch that skips the attention heads that carry little.

For the first `calibration_steps` sampling steps attention runs in full while, for every layer and head,
the normalised entropy H/log(N) of its attention is measured on an evenly spaced sample of queries. Then
the heads whose attention is most spread out are pruned.
A head whose every query averages over the whole sequence adds an almost position-independent term: the mean
of its values. For a pruned head the q/k/v rows of the fused `qkv` projection, its attention and its columns
of the `out` projection are not computed at all; its contribution becomes the one it made at the last full
step (`reuse`), that one shifted by the change of its mean value vector since then (`track_mean`: exact for
a head that attends uniformly, and cheap: the input's token mean through the pruned heads' value rows and
out columns), or nothing (`zero`). `refresh_every` runs a full step after every few pruned ones, refreshing
the cached outputs.

At the first pruned step of a run each pruned layer cuts its kept heads' `qkv` rows and `out` columns into
dense weights of their own (from the weights the layer computes with, LoRA applied), so every pruned step
runs two smaller matmuls and one attention call over the kept heads, with no gathers; the pruned heads'
cached term is projected once and added as one tensor. The kept heads' attention goes through ComfyUI's
attention function and any `optimized_attention_override` on the model (core's BlockSparseAttention, say).

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
CALIBRATE, PRUNE, REFRESH, FULL = "calibrate", "prune", "refresh", "full"
RULES = ("keep_ratio", "threshold")
PRUNED_OUTPUT = ("reuse", "track_mean", "zero")
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
                io.Float.Input("keep_ratio", default=0.45, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of heads kept (rule keep_ratio). 1.0 prunes nothing."),
                io.Float.Input("threshold", default=0.9, min=0.0, max=1.0, step=0.01,
                               tooltip="Normalised entropy H/log(N) above which a head is pruned (rule threshold); "
                                       "1.0 means a perfectly uniform attention."),
                io.Int.Input("min_heads_per_layer", default=1, min=0, max=1024,
                             tooltip="Each layer keeps at least this many heads, its lowest-entropy ones."),
                io.Combo.Input("pruned_heads", options=list(PRUNED_OUTPUT), default="track_mean",
                               tooltip="What replaces a pruned head's output. reuse: its output at the last "
                                       "full step (holds one attention output per layer in memory). track_mean: that "
                                       "output shifted by the change of the head's mean value vector since then "
                                       "(exact for a head that attends uniformly; costs a mean over the tokens). "
                                       "zero: nothing (no memory)."),
                io.Int.Input("sample_queries", default=256, min=8, max=65536,
                             tooltip="Queries per head whose attention entropy is measured (evenly spaced over the "
                                     "sequence). The measurement never holds the full N x N attention."),
                io.Combo.Input("attention_backend", options=attention_backends(), default=DEFAULT_BACKEND,
                               tooltip="Attention function for this model's (kept) heads, chosen per run without "
                                       "restarting ComfyUI. 'comfy default' is what ComfyUI was started with."),
                io.Int.Input("refresh_every", default=2, min=0, max=1000, optional=True,
                             tooltip="After this many pruned steps, one step runs in full and refreshes the pruned "
                                     "heads' reused output (the decision stays). 0: never."),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, model, calibration_steps, rule, keep_ratio, threshold, min_heads_per_layer, pruned_heads,
                sample_queries=256, attention_backend=DEFAULT_BACKEND, refresh_every=2) -> io.NodeOutput:
        config = PruneConfig(calibration_steps, rule, keep_ratio, threshold, min_heads_per_layer, pruned_heads,
                             sample_queries, attention_backend, refresh_every)
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
            f"{100 * report['attention_flops_removed']:.1f}% of attention FLOPs removed on pruned steps "
            f"({100 * report['attention_flops_removed_run']:.1f}% over the run)")
    if report.get("warnings"):
        line += " (" + "; ".join(report["warnings"]) + ")"
    return line


# ---------------------------------------------------------------------------------------------------
# Patching.

@dataclass
class PruneConfig:
    calibration_steps: int = 2
    rule: str = "keep_ratio"
    keep_ratio: float = 0.45
    threshold: float = 0.9
    min_heads_per_layer: int = 1
    pruned_heads: str = "track_mean"
    sample_queries: int = 256
    attention_backend: str = DEFAULT_BACKEND
    refresh_every: int = 2

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
        if self.refresh_every < 0:
            raise PruningError(f"refresh_every {self.refresh_every} is negative; 0 never refreshes.")
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
        options["optimized_attention_override"] = backend_override(config.attention_backend,
                                                                   options.get("optimized_attention_override"))
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, state.outer_sample_wrapper)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, state.diffusion_model_wrapper)
    return m


def state_of(model) -> PruneState | None:
    session = model.model_options.get("transformer_options", {}).get(SESSION_KEY)
    return _STATES.get(session) if session else None


def backend_override(name: str, previous=None):
    """An attention override that runs `name`; an override already on the model (core's sparse attention, say)
    stays in charge and gets `name` as the function it falls back to."""
    function = comfy_attention.get_attention_function(name)

    def override(default_function, *args, **kwargs):
        if previous is not None:
            return previous(function, *args, **kwargs)
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
        if phase == PRUNE and layer.pruned:
            return forward_kept_heads(self.module, layer, self.state, x, x_mask, freqs_cis, transformer_options)
        layer.tokens = x.shape[1]
        if phase == FULL or (phase != CALIBRATE and not layer.pruned):
            return JointAttention.forward(self.module, x, x_mask, freqs_cis, transformer_options=transformer_options)
        q, k, v = project(self.module, x, freqs_cis)
        output = comfy_attention.optimized_attention_masked(q, k, v, self.module.n_local_heads, x_mask, skip_reshape=True,
                                                            transformer_options=transformer_options)
        config = self.state.config
        key = batch_key(transformer_options, output)
        if phase == CALIBRATE:
            layer.add_entropy(attention_entropy(q, k, x_mask, config.sample_queries))
        if config.pruned_heads != "zero":  # calibration, and the refresh steps of pruned layers
            layer.keep_output(key, output.detach(), token_mean(x, x_mask) if config.pruned_heads == "track_mean" else None)
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
    """Attention over the kept heads only, through their own dense weights (built once a run, see KeptHeads):
    one smaller qkv matmul, one attention call, one smaller out matmul, and one tensor added for the pruned heads."""
    bsz, seqlen, _ = x.shape
    mode = state.config.pruned_heads
    packed = layer.kept_heads(module, x, mode == "track_mean")
    if packed.heads == 0:  # every head pruned (min_heads_per_layer 0): no attention at all in this layer
        y = x.new_zeros(bsz, seqlen, packed.out_weight.shape[0])
    else:
        qkv = F.linear(x, packed.qkv_weight, packed.qkv_bias)
        xq, xk, xv = qkv.view(bsz, seqlen, 3, packed.heads, module.head_dim).unbind(2)
        xq, xk = apply_rope(module.q_norm(xq), module.k_norm(xk), freqs_cis)
        mask = x_mask
        if mask is not None and mask.ndim == 4 and mask.shape[1] == module.n_local_heads:
            mask = mask.index_select(1, layer.index("heads", mask.device))
        output = comfy_attention.optimized_attention_masked(xq.movedim(1, 2), xk.movedim(1, 2), xv.movedim(1, 2),
                                                            packed.heads, mask, skip_reshape=True,
                                                            transformer_options=transformer_options)
        y = F.linear(output, packed.out_weight)
    key = batch_key(transformer_options, y)
    y = y.add_(layer.pruned_term(key, module, packed, mode))
    if mode == "track_mean" and packed.pruned_values is not None:
        y = y.add_(layer.mean_shift(key, packed, token_mean(x, x_mask)))
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


def token_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mean of the attention's input over the tokens, (B, 1, dim): a uniformly attending head outputs its
    value projection of it. None where a mask makes "uniform" mean something else per query (padding)."""
    return x.mean(dim=1, keepdim=True) if mask is None else None


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
# Run state: measurements, decisions, the kept heads' weights, pruned heads' terms, the report.

@dataclass
class KeptHeads:
    """One layer's kept heads as dense weights of their own: the `qkv` rows of the kept heads (q, then k, then v)
    and their `out` columns, cut once from the weights the layer really computes with (LoRA and other patches
    applied), so pruned steps run plain matmuls with no per-step gathers."""
    heads: int
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    out_weight: torch.Tensor
    out_bias: torch.Tensor | None
    pruned_values: torch.Tensor | None = None  # track_mean: the pruned heads' v rows
    pruned_out: torch.Tensor | None = None  # and their out columns


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
    outputs: dict = field(default_factory=dict)  # batch key -> (attention output (B, N, heads*hd), token mean)
    terms: dict = field(default_factory=dict)  # batch key -> the pruned heads' term(s) through `out` (B, N, dim)
    packed: dict = field(default_factory=dict)  # (device, dtype) -> KeptHeads
    _index_cache: dict = field(default_factory=dict)

    def add_entropy(self, entropy: torch.Tensor) -> None:
        # summed where it was measured: a copy to the CPU here would make every calibrating layer wait for the GPU
        entropy = entropy.detach().double()
        self.entropy_sum = entropy if self.entropy_sum is None else self.entropy_sum + entropy.to(self.entropy_sum.device)
        self.calls += 1

    @property
    def entropy(self) -> list[float] | None:
        return None if self.entropy_sum is None else (self.entropy_sum / self.calls).cpu().tolist()

    def keep_output(self, key, output: torch.Tensor, mean: torch.Tensor | None) -> None:
        """Remember a full step's attention output and its input's token mean, and drop the term made from the
        previous one."""
        self.outputs[key] = (output, mean)
        self.terms.pop(key, None)

    def reset(self) -> None:
        self.entropy_sum, self.calls = None, 0
        self.keep, self.pruned = [], []
        for store in (self.outputs, self.terms, self.packed, self._index_cache):
            store.clear()

    def index(self, kind: str, device) -> torch.Tensor:
        """Indices of the kept heads ("heads"), their qkv rows ("qkv"), their out columns ("out") or the pruned
        heads' out columns ("pruned")."""
        key = (kind, str(device))
        if key not in self._index_cache:
            hd, heads = self.head_dim, self.heads
            if kind == "heads":
                values = self.keep
            elif kind == "qkv":  # q rows, then k rows, then v rows of the kept heads
                values = [part * heads * hd + h * hd + i for part in range(3) for h in self.keep for i in range(hd)]
            elif kind == "out":
                values = [h * hd + i for h in self.keep for i in range(hd)]
            else:
                values = [h * hd + i for h in self.pruned for i in range(hd)]
            self._index_cache[key] = torch.tensor(values, dtype=torch.long, device=device)
        return self._index_cache[key]

    def kept_heads(self, module: JointAttention, x: torch.Tensor, pruned_values: bool = False) -> KeptHeads:
        """The kept heads' weights for x's device and dtype, cut at the first pruned step of a run (after ComfyUI
        has patched the model's weights for the run) and kept until the next run; with `pruned_values`, also the
        pruned heads' value rows and out columns (for track_mean)."""
        key = (x.device, x.dtype)
        packed = self.packed.get(key)
        if packed is None:
            qkv_weight, qkv_bias = effective_weight(module.qkv, x)
            out_weight, out_bias = effective_weight(module.out, x)
            rows, cols = self.index("qkv", qkv_weight.device), self.index("out", out_weight.device)
            packed = KeptHeads(len(self.keep), qkv_weight.index_select(0, rows).contiguous(),
                               None if qkv_bias is None else qkv_bias.index_select(0, rows).contiguous(),
                               out_weight.index_select(1, cols).contiguous(),
                               None if out_bias is None else out_bias.clone())
            if pruned_values:
                pruned = self.index("pruned", out_weight.device)
                value_rows = 2 * self.heads * self.head_dim + pruned  # v follows q and k in the fused qkv
                packed.pruned_values = qkv_weight.index_select(0, value_rows).contiguous()
                packed.pruned_out = out_weight.index_select(1, pruned).contiguous()
            self.packed[key] = packed
        return packed

    def pruned_term(self, key, module: JointAttention, packed: KeptHeads, mode: str) -> torch.Tensor | float:
        """What the pruned heads add to the layer's output, with the out bias folded in: one tensor to add.
        reuse and track_mean: their output at the last full step through their `out` columns; zero: the bias."""
        bias = 0.0 if packed.out_bias is None else packed.out_bias
        cached = self.outputs.get(key) if mode != "zero" else None
        if cached is None:
            return bias
        if key not in self.terms:
            output = cached[0]
            weight, _ = effective_weight(module.out, output)
            cols = self.index("pruned", weight.device)
            self.terms[key] = F.linear(output.index_select(-1, cols), weight.index_select(1, cols)) + bias
        return self.terms[key]

    def mean_shift(self, key, packed: KeptHeads, mean: torch.Tensor | None) -> torch.Tensor | float:
        """How far the pruned heads' outputs moved since the last full step if they attended uniformly: the change
        of their mean value vector (a linear map of the input's token mean), through their `out` columns."""
        cached = self.outputs.get(key)
        if mean is None or cached is None or cached[1] is None:
            return 0.0
        return F.linear(F.linear(mean - cached[1], packed.pruned_values), packed.pruned_out)

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
        self.phase_calls: dict[str, int] = {}
        self.sigmas: list[float] | None = None

    def reset(self) -> None:
        for layer in self.layers.values():
            layer.reset()
        self.decided = False
        self.warnings = []
        self.phase_calls = {}
        self.sigmas = None

    # Wrappers (keyed, so they stack with other patches and leave with the clone).

    def outer_sample_wrapper(self, executor, *args, **kwargs):
        self.reset()
        return executor(*args, **kwargs)

    def diffusion_model_wrapper(self, executor, *args, **kwargs):
        options = dict(kwargs.get("transformer_options", {}))
        phase = options[PHASE_KEY] = self.phase(options)
        self.phase_calls[phase] = self.phase_calls.get(phase, 0) + 1
        if phase == PRUNE and not self.decided:
            self.decide()
        kwargs["transformer_options"] = options
        return executor(*args, **kwargs)

    def phase(self, options: dict) -> str:
        """This model call's phase. Steps are counted on the run's sigmas: a call at a sigma between two
        of them (a second-order sampler's intermediate evaluation) belongs to the step it starts from."""
        sigmas, sigma = options.get("sample_sigmas"), options.get("sigmas")
        if sigmas is None or sigma is None:
            return FULL  # called outside a sampler: behave as the unpatched model
        if self.sigmas is None:
            self.sigmas = [float(s) for s in sigmas]  # once a run: the schedule lives on the CPU from here on
        value = float(sigma.max())
        steps = len(self.sigmas) - 1
        k = self.config.calibration_steps
        if k >= steps:
            message = (f"calibration_steps {k} is not below the {steps} sampling steps: calibrated on all of them and "
                       "pruned nothing; lower calibration_steps to prune")
            if message not in self.warnings:
                self.warnings.append(message)
                log.warning("Z-Image entropy pruning: %s", message)
            return CALIBRATE
        step = sum(1 for s in self.sigmas[1:-1] if value <= s * (1 + 1e-6) + 1e-9)
        if step < k:
            return CALIBRATE
        r = self.config.refresh_every
        if r and (step - k) % (r + 1) == r and step < steps - 1:  # a full step after every r pruned ones (not the last)
            return REFRESH
        return PRUNE

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
                layer.outputs.clear()
        report = self.report()
        log.info("Z-Image entropy pruning: %s", summary_line(report))

    def report(self) -> dict:
        layers = list(self.layers.values())
        total = sum(layer.attention_flops(layer.heads, self.model_dim) for layer in layers)
        removed = sum(layer.attention_flops(len(layer.pruned), self.model_dim) for layer in layers)
        per_step = removed / total if total else 0.0
        calls = sum(self.phase_calls.get(p, 0) for p in (CALIBRATE, REFRESH, PRUNE))
        c = self.config
        return {
            "measured": any(layer.entropy_sum is not None for layer in layers), "decided": self.decided,
            "rule": c.rule, "keep_ratio": c.keep_ratio, "threshold": c.threshold,
            "calibration_steps": c.calibration_steps, "refresh_every": c.refresh_every,
            "min_heads_per_layer": c.min_heads_per_layer,
            "pruned_heads": c.pruned_heads, "attention_backend": c.attention_backend,
            "heads_total": sum(layer.heads for layer in layers),
            "heads_pruned": sum(len(layer.pruned) for layer in layers),
            "attention_flops_removed": round(per_step, 4),
            # over the whole run: the calibration and refresh steps run in full
            "attention_flops_removed_run": round(per_step * self.phase_calls.get(PRUNE, 0) / calls, 4) if calls else 0.0,
            "model_calls": {p: n for p, n in self.phase_calls.items() if p != FULL},
            "layers": [{"layer": layer.name, "tokens": layer.tokens, "pruned": layer.pruned,
                        "entropy": [round(e, 4) for e in layer.entropy] if layer.entropy_sum is not None else None}
                       for layer in layers],
            "warnings": list(self.warnings),
        }


NODES = [ZImageEntropyPrunedAttention, ZImagePruningReport]  # what this module adds to ComfyUI
