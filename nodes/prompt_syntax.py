"""Z-Image prompt syntax: weighted spans, quotes, normalisation and the prompt's limits, with no ComfyUI.

- weighted spans, `(汉服:1.3)` or `（汉服：1.3）`, nested (weights multiply) and escaped (`\\(`), the way
  ComfyUI users write them; a bare `(…)` is 1.1 as in core, a bare `（…）` is ordinary Chinese text;
- quoted text (“…”, "…", 「…」, 『…』) is one segment, never weighted apart and never normalised;
- normalisation that only helps: full-width Latin letters and digits fold to ASCII, stray whitespace goes
  (runs collapse, none between two Chinese characters), Chinese punctuation stays Chinese, traditional
  characters stay traditional;
- the limits a prompt is checked against before any tokenizing.

The Chinese text encode node (chinese_text.py) tokenizes and encodes what `parse` and `normalise_segments` give.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

MAX_TOKENS = 512  # Z-Image's trained maximum prompt length (the official pipeline's max_sequence_length)
# 512 tokens are a few thousand characters; a prompt many times longer is a mistake (or an attack on the server's
# time), refused before any parsing or tokenising.
MAX_PROMPT_CHARS = 20_000
QUOTES = {"“": "”", '"': '"', "「": "」", "『": "』"}
OPEN, CLOSE = "(（", ")）"
FOLDED_SYMBOLS = "＋－＝％＃＆＠＿／＊＜＞＾｜＄"  # full-width symbols with no Chinese use; Chinese punctuation is kept
# Chinese characters, CJK punctuation and full-width forms: a space between two of them is stray
CHINESE = "[\u3000-\u303f\u3400-\u9fff\uf900-\ufaff\uff00-\uffef\U00020000-\U0002fa1f]"
STRAY_SPACE = re.compile(f"(?<={CHINESE}) (?={CHINESE})")


# ---------------------------------------------------------------------------------------------------
# Parsing weights.

@dataclass
class Segment:
    text: str
    weight: float = 1.0
    quoted: bool = False


def parse(text: str) -> list[Segment]:
    """Split a prompt into segments with weights. Never raises: anything that is not valid syntax is text.

    Linear in the prompt's length and iterative (no recursion): every bracket's partner and every quote's closing
    mark are found in one pass each, then one walk emits the segments."""
    closes = bracket_partners(text)
    quote_end = next_quote_closes(text)
    segments: list[Segment] = []
    frames: list[tuple[int, float, str, int]] = []  # the enclosing range: (end, weight, text after it, resume at)
    i, end, weight, buf = 0, len(text), 1.0, []

    def flush():
        if buf:
            segments.append(Segment("".join(buf), weight))
            buf.clear()

    while True:
        if i >= end:
            flush()
            if not frames:
                break
            end, weight, tail, i = frames.pop()
            buf.append(tail)
            continue
        c = text[i]
        if c == "\\" and i + 1 < end and text[i + 1] in OPEN + CLOSE + "\\":
            buf.append(text[i + 1])
            i += 2
        elif c in QUOTES and (j := quote_end[c][i]) < end:
            flush()
            segments.append(Segment(text[i:j + 1], weight, quoted=True))
            i = j + 1
        elif c in OPEN and (j := closes.get(i, end)) < end:
            inner_end, group_weight = group(text, i + 1, j, c == "(")
            if group_weight is None:  # a bare full-width bracket: ordinary text, its inside still parsed
                buf.append(c)
                flush()
                frames.append((end, weight, text[j], j + 1))
                i, end = i + 1, j
            else:
                flush()
                frames.append((end, weight, "", j + 1))
                i, end, weight = i + 1, inner_end, weight * group_weight
        else:
            buf.append(c)
            i += 1
    merged: list[Segment] = []
    for s in segments:  # neighbours with the same weight and kind become one
        if merged and merged[-1].weight == s.weight and merged[-1].quoted == s.quoted and s.text:
            merged[-1].text += s.text
        elif s.text:
            merged.append(s)
    return merged


def next_quote_closes(text: str) -> dict[str, list[int]]:
    """For each opening quote mark, the index of the next closing mark after each position (len(text) if none)."""
    out = {}
    for opening, closing in QUOTES.items():
        nxt, after = [len(text)] * (len(text) + 1), len(text)
        for k in range(len(text) - 1, -1, -1):
            nxt[k] = after  # the first closing mark after k
            if text[k] == closing:
                after = k
        out[opening] = nxt
    return out


def bracket_partners(text: str) -> dict[int, int]:
    """{index of an opening bracket: index of the bracket closing it}, either width closing either. A backslash
    hides the bracket or backslash after it, and a quotation that closes hides its brackets (as `parse` reads them)."""
    quote_end = next_quote_closes(text)
    partners, stack, k = {}, [], 0
    while k < len(text):
        c = text[k]
        if c == "\\" and k + 1 < len(text) and text[k + 1] in OPEN + CLOSE + "\\":
            k += 2
            continue
        if c in QUOTES and quote_end[c][k] < len(text):
            k = quote_end[c][k] + 1
            continue
        if c in OPEN:
            stack.append(k)
        elif c in CLOSE and stack:
            partners[stack.pop()] = k
        k += 1
    return partners


WEIGHT_SUFFIX = re.compile(r"[:：]\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*$")
WEIGHT_SUFFIX_CHARS = 64  # a `:weight` ends a group within this many characters; longer is not a weight
FULL_WIDTH_MAX_WEIGHT = 3.0
MAX_WEIGHT = 100.0  # a span's weight, brackets multiplied; 1.1 ** 1000 nested brackets would overflow fp32


def group(text: str, start: int, end: int, ascii_bracket: bool) -> tuple[int, float | None]:
    """(where the group's text ends, its weight) for the group text[start:end]: an explicit `:w` / `：w`, else 1.1
    for ASCII brackets and None (not a weight) for full-width ones. Chinese text puts ratios and scores in
    full-width brackets — （画幅比例 16：9）, （比分 3：1） — so there a weight needs a non-digit before the
    colon and at most 3. Only the group's end is read, so nested groups cost linear time in all."""
    tail_start = max(start, end - WEIGHT_SUFFIX_CHARS)
    m = WEIGHT_SUFFIX.search(text, tail_start, end)
    if m:
        colon, weight = m.start(), float(m.group(1))
        before = text[max(start, colon - WEIGHT_SUFFIX_CHARS):colon].rstrip()
        if ascii_bracket or (before[-1:] and not before[-1].isdigit() and weight <= FULL_WIDTH_MAX_WEIGHT):
            return colon, weight
    return end, (1.1 if ascii_bracket else None)


# ---------------------------------------------------------------------------------------------------
# Normalisation.

def normalise_text(text: str) -> str:
    """Full-width ASCII letters, digits and a few symbols to ASCII, whitespace runs to one space, no space between two
    Chinese characters, none at the ends. Chinese punctuation and everything else unchanged."""
    folded = "".join(chr(ord(c) - 0xFEE0) if ("０" <= c <= "９" or "Ａ" <= c <= "Ｚ" or "ａ" <= c <= "ｚ"
                                             or c in FOLDED_SYMBOLS) else c for c in text)
    folded = re.sub(r"[ \t\u3000\u00a0]+", " ", folded)
    folded = re.sub(r" *\n[ \n]*", "\n", folded)
    return STRAY_SPACE.sub("", folded)


def normalise_segments(segments: list[Segment]) -> list[Segment]:
    """Normalise the unquoted text; whitespace at the prompt's ends goes, at segment joins it is judged on
    the joined text."""
    out = [Segment(s.text if s.quoted else normalise_text(s.text), s.weight, s.quoted) for s in segments]
    for a, b in zip(out, out[1:], strict=False):  # the same rule across a segment join
        if not a.quoted and not b.quoted and STRAY_SPACE.search(a.text[-2:] + b.text[:1]):
            a.text = a.text[:-1]
    if out and not out[0].quoted:
        out[0].text = out[0].text.lstrip()
    if out and not out[-1].quoted:
        out[-1].text = out[-1].text.rstrip()
    return [s for s in out if s.text]


def char_weights(segments: list[Segment]) -> list[float]:
    """The weight of each character of the segments' joined text."""
    return [s.weight for s in segments for _ in s.text]


# ---------------------------------------------------------------------------------------------------
# Checks that need no tokenizer: each gives what is wrong, in a sentence that says how to fix it, or None.

def text_problem(text: str) -> str | None:
    """A prompt too long to be meant, or one holding a lone surrogate: refused before any parsing or tokenising."""
    if len(text) > MAX_PROMPT_CHARS:
        return (f"The prompt is {len(text):,} characters; this node takes at most {MAX_PROMPT_CHARS:,} and Z-Image "
                f"reads only its first {MAX_TOKENS} tokens (a few thousand characters). Shorten the prompt.")
    if any("\ud800" <= c <= "\udfff" for c in text):
        return ("The prompt holds a lone UTF-16 surrogate (U+D800–U+DFFF), which is not a character; the text was "
                "mis-encoded where it came from. Retype or re-paste it.")
    return None


def weight_problem(segments: list[Segment]) -> str | None:
    """A span whose brackets multiply past MAX_WEIGHT (or to NaN)."""
    unbounded = next((s for s in segments if not s.weight <= MAX_WEIGHT), None)  # NaN fails too
    if unbounded is None:
        return None
    return (f"The weights around {unbounded.text[:40]!r} multiply to {unbounded.weight:.3g} (brackets nested too "
            f"deep, or a weight too large); above {MAX_WEIGHT:g} a span drowns the rest of the prompt and the text "
            "encoder's numbers overflow to a black image. Use one bracket with the weight you want, such as (汉服:1.5).")
