"""Z-Image Chinese Text Encode: first-class Chinese and bilingual prompts.

What it adds to core CLIPTextEncode, never changing what the model expects:
- normalisation that only helps: full-width Latin letters and digits fold to ASCII, stray whitespace goes
  (runs collapse, none between two Chinese characters), Chinese punctuation stays Chinese, traditional
  characters stay traditional, and quoted text (“…”, "…", 「…」, 『…』) is never touched;
- weighted spans, `(汉服:1.3)` or `（汉服：1.3）`, nested (weights multiply) and escaped (`\\(`), the way
  ComfyUI users write them; a bare `(…)` is 1.1 as in core, a bare `（…）` is ordinary Chinese text;
- statistics: the real Qwen tokenizer's token count, what was cut beyond the trained maximum (512),
  the weighted spans, the quoted texts, and C_text for the k_gen report.

Plain text is tokenized and encoded by core's own code, so its conditioning is core's exactly. Weights
are applied afterwards to the hidden states of the span's tokens: h' = μ + w·(h − μ), with μ the mean hidden
state of the prompt's own tokens. Core's way (moving a token away from an empty prompt's encoding) cannot
be used: Qwen's empty prompt is fully masked and encodes to NaN, which is why core disables weights here.

The prompt syntax (parsing, normalisation, the limits) is prompt_syntax.py, which needs no ComfyUI.
"""
from __future__ import annotations

import json
import logging
import threading
import unicodedata
import weakref
from dataclasses import dataclass

import torch
from comfy_api.latest import io

from .prompt_syntax import MAX_TOKENS, Segment, char_weights, normalise_segments, parse, text_problem, weight_problem
from .shared import PromptStats, ZImageError

log = logging.getLogger("comfyui-zimage")

TEMPLATES = {"z-image chat": None, "raw": "{}"}  # None: the tokenizer's own (ComfyUI's Z-Image chat template)
CHAT_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


class TextEncodeError(ZImageError):
    """A CLIP this node cannot use, with what to do about it."""


# ---------------------------------------------------------------------------------------------------
# Node.

class ZImageChineseTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ZImageChineseTextEncode",
            display_name="Z-Image Chinese Text Encode",
            category="Z-Image/conditioning",
            description="Encodes a Chinese, English or mixed prompt for Z-Image: the same conditioning as CLIP Text "
                        "Encode for plain text, plus weighted spans (汉服:1.3) / （汉服：1.3）, safe normalisation, "
                        "quoted text kept intact, and token statistics.",
            inputs=[
                io.Clip.Input("clip", tooltip="Z-Image's Qwen3 text encoder (from the Z-Image loader or core CLIP loader)."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, default="",
                                tooltip="The prompt. (词:1.3) or （词：1.3） weights a span, (词) is 1.1, nested weights "
                                        "multiply, \\( writes a literal bracket. Text in “”, \"\", 「」 or 『』 is drawn "
                                        "as written. Empty is an empty prompt (for negatives)."),
                io.Boolean.Input("normalise", default=True,
                                 tooltip="Fold full-width letters and digits to ASCII and remove stray whitespace; "
                                         "Chinese punctuation, traditional characters and quoted text are kept."),
                io.Combo.Input("template", options=list(TEMPLATES), default="z-image chat",
                               tooltip="z-image chat: the chat template Z-Image was trained with (what core uses). "
                                       "raw: the text alone, for experiments."),
            ],
            outputs=[io.Conditioning.Output(display_name="CONDITIONING"),
                     PromptStats.Output(display_name="prompt_stats",
                                        tooltip="Token count, truncation, spans, quotes and C_text (for the k_gen report)."),
                     io.String.Output(display_name="stats_json", tooltip="The statistics as JSON.")],
        )

    @classmethod
    def execute(cls, clip, text, normalise=True, template="z-image chat") -> io.NodeOutput:
        if clip is None:
            raise TextEncodeError("No CLIP is connected. Connect the CLIP output of the Z-Image Checkpoint Loader.")
        conditioning, stats = encode(clip, text, normalise, template)
        line = f"{stats['tokens']} tokens (max {stats['max_tokens']})"
        if stats["truncated"]:
            line += f" — cut: {stats['cut_text'][:80]}"
        if stats["spans"]:
            line += ", weighted: " + ", ".join(f"{s['text']}×{s['weight']:g}" for s in stats["spans"])
        if stats.get("warning") and not stats["truncated"]:
            line += " — " + stats["warning"]
        return io.NodeOutput(conditioning, stats, json.dumps(stats, ensure_ascii=False), ui={"text": [line]})


# ---------------------------------------------------------------------------------------------------
# Encoding.

def qwen_tokenizer(clip):
    """The Z-Image tokenizer inside a CLIP, or a clear error for another text encoder."""
    tokenizer = getattr(getattr(clip, "tokenizer", None), "qwen3_4b", None)
    if tokenizer is None:
        raise TextEncodeError("This CLIP is not Z-Image's Qwen3 text encoder. Load it with the Z-Image Checkpoint "
                              "Loader (or core CLIP Loader, type lumina2 / qwen_image) and connect its CLIP output.")
    return tokenizer


def encode(clip, text: str, normalise: bool = True, template: str = "z-image chat") -> tuple[list, dict]:
    """(conditioning, statistics). Plain text goes through core's tokenize and encode unchanged."""
    tokens, token_weights, stats = prepare(clip, text, normalise, template)
    conditioning = clip.encode_from_tokens_scheduled(tokens)
    if not all(bool(torch.isfinite(c[0]).all()) for c in conditioning):
        if not stats["tokens"] and template == "raw":
            raise TextEncodeError("An empty prompt with the raw template leaves the text encoder nothing to read (its "
                                  "output is NaN, a black image): write a prompt, or use the z-image chat template, "
                                  "where an empty prompt is fine.")
        raise TextEncodeError("The text encoder produced NaN or infinite values, which would make a black image. Usual "
                              "causes: the encoder running in fp16 (Qwen3 needs bf16 or fp32), or NaN/infinite weights "
                              "in the text-encoder file (download it again).")
    if any(w != 1.0 for w in token_weights.values()):
        conditioning = apply_weights(conditioning, token_weights, len(tokens["qwen3_4b"][0]))
    return conditioning, stats


def prepare(clip, text: str, normalise: bool = True, template: str = "z-image chat") -> tuple[dict, dict[int, float], dict]:
    """(core's tokens, the weight of each prompt token by index, statistics). Tokens are mapped back to
    characters only when there are weights to place or a tail to cut. Needs only the CLIP's tokenizer."""
    if template not in TEMPLATES:
        raise TextEncodeError(f"template {template!r} is not one of {', '.join(TEMPLATES)}.")
    if problem := text_problem(text or ""):
        raise TextEncodeError(problem)
    inner = qwen_tokenizer(clip)
    segments = parse(text or "")
    if problem := weight_problem(segments):
        raise TextEncodeError(problem)
    if normalise:
        segments = normalise_segments(segments)
    # the tokenizer composes to NFC itself; doing it first keeps the characters and the tokens in step
    segments = [Segment(unicodedata.normalize("NFC", s.text), s.weight, s.quoted) for s in segments]
    plain = "".join(s.text for s in segments)
    llama_template = TEMPLATES[template]
    tokens = tokenize(clip, plain, llama_template)
    pairs = tokens["qwen3_4b"][0]
    n_content = len(pairs) - template_tokens(clip, inner, llama_template) if plain else 0
    weighted = any(s.weight != 1.0 for s in segments)
    token_weights: dict[int, float] = {}
    problems: list[str] = []
    n_prompt = n_content  # before any cut
    cut_text, truncated = "", n_content > MAX_TOKENS
    if weighted or truncated:
        layout = template_layout(llama_template or CHAT_TEMPLATE, plain)
        offsets = token_char_offsets(inner.tokenizer, [t for t, _ in pairs], layout.full)
        content = [i for i, off in enumerate(offsets) if off is not None and layout.start <= off < layout.end]
        weights = char_weights(segments)
        ends = offsets[1:] + [len(layout.full)]  # offsets are all known or all None
        token_weights = {i: token_weight(plain, weights, offsets[i] - layout.start, ends[i] - layout.start)
                         for i in content}
        if weighted and not content and plain.strip():
            problems.append("The prompt's tokens could not be matched to its characters, so its weights were not "
                            "applied (unusual escapes or characters).")
        if truncated and len(content) > MAX_TOKENS:
            cut_text = plain[offsets[content[MAX_TOKENS]] - layout.start:]
            dropped = set(content[MAX_TOKENS:])
            kept = [i for i in range(len(pairs)) if i not in dropped]
            new_index = {old: new for new, old in enumerate(kept)}
            pairs = [pairs[i] for i in kept]
            token_weights = {new_index[i]: w for i, w in token_weights.items() if i not in dropped}
            tokens = dict(tokens, qwen3_4b=[pairs])
            log.warning("Z-Image Chinese Text Encode: the prompt has %d tokens, more than %d; cut: %s", n_content,
                        MAX_TOKENS, cut_text[:200])
            n_content = MAX_TOKENS
    weight_sum = sum(token_weights.values()) if token_weights else float(n_content)
    stats = {"tokens": n_content, "prompt_tokens": n_prompt, "total_tokens": len(pairs), "max_tokens": MAX_TOKENS,
             "truncated": bool(cut_text),
             "cut_text": cut_text,
             "spans": [{"text": s.text, "weight": round(s.weight, 4)} for s in segments if s.weight != 1.0],
             "quotes": [s.text[1:-1] for s in segments if s.quoted], "text": plain, "template": template,
             "c_text": round(weight_sum / MAX_TOKENS, 6),
             "c_text_definition": "sum of the prompt tokens' weights / 512 (the trained maximum)"}
    if cut_text:
        problems.append(f"The prompt is longer than {MAX_TOKENS} tokens; the end was cut: {cut_text[:200]}")
    elif truncated:
        problems.append(f"The prompt is longer than {MAX_TOKENS} tokens, but its tokens could not be matched to its "
                        "characters, so it was not cut.")
    if problems:
        stats["warning"] = " ".join(problems)
    return tokens, token_weights, stats


def tokenize(clip, text: str, llama_template: str | None) -> dict:
    """Core's tokenization, exactly as CLIPTextEncode calls it for the default template."""
    return clip.tokenize(text, llama_template=llama_template) if llama_template else clip.tokenize(text)


_TEMPLATE_TOKENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def template_tokens(clip, inner, llama_template: str | None) -> int:
    """Tokens the template adds around any prompt (its special tokens never merge with the prompt's)."""
    if llama_template == "{}":
        return 0  # raw text: nothing around it (an empty one is padded to one token, counted as none)
    counts = _TEMPLATE_TOKENS.setdefault(inner, {})
    if llama_template not in counts:
        counts[llama_template] = len(tokenize(clip, "", llama_template)["qwen3_4b"][0])
    return counts[llama_template]


@dataclass
class Layout:
    full: str  # the text the tokenizer saw
    start: int  # where the prompt starts in it (characters)
    end: int


def template_layout(template: str, plain: str) -> Layout:
    prefix = template.split("{}")[0]
    return Layout(template.format(plain), len(prefix), len(prefix) + len(plain))


def token_weight(plain: str, weights: list[float], start: int, end: int) -> float:
    """A token's weight: the one furthest from 1 among the non-space characters it covers. BPE joins a leading
    space or a neighbouring character to a word (" red", 的女孩), and a weight must not be lost to that."""
    covered = [weights[i] for i in range(start, min(end, len(weights))) if not plain[i].isspace()]
    return max(covered, key=lambda w: abs(w - 1.0)) if covered else weights[start]


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-ins for bytes (Qwen's tokenizer uses the same), inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


BYTE_DECODER = _byte_decoder()


def token_char_offsets(tokenizer, ids: list[int], text: str) -> list[int | None]:
    """Character offset in `text` where each token starts, read from the tokens' own bytes; None for every
    token if they do not spell the text (an unexpected tokenizer), so that no weight lands on a wrong token."""
    special = set(getattr(tokenizer, "all_special_ids", []) or []) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    data = text.encode("utf-8")
    char_at = []
    for i, ch in enumerate(text):
        char_at.extend([i] * len(ch.encode("utf-8")))
    offsets, pos = [], 0
    for tid in ids:
        piece = tokenizer.convert_ids_to_tokens(tid)
        try:
            raw = piece.encode("utf-8") if tid in special else bytes(BYTE_DECODER[c] for c in piece)
        except KeyError:
            raw = piece.encode("utf-8")
        if data[pos:pos + len(raw)] != raw:
            log.warning("Z-Image Chinese Text Encode: tokens do not spell the text; weights are not applied")
            return [None] * len(ids)
        offsets.append(char_at[pos] if pos < len(char_at) else None)
        pos += len(raw)
    return offsets


def apply_weights(conditioning: list, token_weights: dict[int, float], n_tokens: int) -> list:
    """h' = μ + w·(h − μ) on the weighted tokens' hidden states, μ the mean over the prompt's tokens."""
    out = []
    content = sorted(token_weights)
    for cond, extra in conditioning:
        if cond.shape[1] != n_tokens:
            log.warning("Z-Image Chinese Text Encode: %d hidden states for %d tokens; weights not applied",
                        cond.shape[1], n_tokens)
            out.append([cond, extra])
            continue
        h = cond.clone()
        mu = h[:, content].mean(dim=1, keepdim=True)
        index = torch.tensor([i for i in content if token_weights[i] != 1.0], dtype=torch.long)
        w = torch.tensor([token_weights[i] for i in index.tolist()], dtype=h.dtype, device=h.device)[None, :, None]
        h[:, index] = mu + w * (h[:, index] - mu)
        out.append([h, extra])
    return out


# ---------------------------------------------------------------------------------------------------
# Live token count for the canvas: POST /zimage/tokens {"text", "normalise", "template"} -> the statistics.
# The web extension calls it as the user types, so the count is the real tokenizer's, not a guess in JS.

class TokenizerOnly:
    """What `prepare` needs of a CLIP (its tokenizer), without loading any text-encoder weights."""

    def __init__(self):
        from comfy.text_encoders.z_image import ZImageTokenizer

        self.tokenizer = ZImageTokenizer(embedding_directory=None, tokenizer_data={})

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)


_TOKENIZER: TokenizerOnly | None = None
_TOKENIZER_LOCK = threading.Lock()
# 512 tokens are at most a few thousand characters; counting further would only cost the server time, so a longer
# prompt is counted on its start and said so.
MAX_COUNTED_CHARS = 4000


def count_tokens(text: str, normalise: bool = True, template: str = "z-image chat") -> dict:
    global _TOKENIZER
    with _TOKENIZER_LOCK:
        if _TOKENIZER is None:
            _TOKENIZER = TokenizerOnly()
    _, _, stats = prepare(_TOKENIZER, text[:MAX_COUNTED_CHARS], normalise, template)
    keys = ("tokens", "prompt_tokens", "max_tokens", "truncated", "cut_text", "spans", "quotes", "c_text")
    return {k: stats[k] for k in keys} | {"warning": stats.get("warning", ""), "capped": len(text) > MAX_COUNTED_CHARS}


# Token counts run one at a time, so a flood of them cannot take the CPU from prompts being sampled; past this many
# waiting, a request is told to come back (the canvas asks again on the next keystroke).
MAX_WAITING_COUNTS = 8


def add_routes(routes) -> None:
    import asyncio

    from aiohttp import web

    one_at_a_time = asyncio.Semaphore(1)
    waiting = 0

    @routes.post("/zimage/tokens")
    async def tokens(request):
        nonlocal waiting
        try:
            body = await request.json()
            if not isinstance(body, dict) or not isinstance(body.get("text", ""), str):
                raise TextEncodeError('Send a JSON object such as {"text": "蓝色背景上的红色圆形"}.')
            normalise, template = body.get("normalise", True), body.get("template", "z-image chat")
            if not isinstance(normalise, bool) or not isinstance(template, str):
                raise TextEncodeError("'normalise' must be true or false and 'template' a template name.")
            if waiting >= MAX_WAITING_COUNTS:
                return web.json_response({"error": "The token counter is busy; ask again in a moment."}, status=429,
                                         headers={"Retry-After": "1"})
            waiting += 1
            try:
                async with one_at_a_time:  # off the event loop, and one count at a time
                    stats = await asyncio.to_thread(count_tokens, body.get("text", ""), normalise, template)
            finally:
                waiting -= 1
            return web.json_response(stats)
        except ValueError as e:  # bad JSON or a bad option: say what, keep serving
            return web.json_response({"error": str(e)}, status=400)
        except Exception as e:  # still an answer, in JSON
            log.exception("Z-Image token count failed")
            return web.json_response({"error": f"{type(e).__name__}: {e}"}, status=500)


NODES = [ZImageChineseTextEncode]  # what this module adds to ComfyUI
