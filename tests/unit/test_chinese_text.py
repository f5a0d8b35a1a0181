"""Chinese text encode, in-process: the weight parser (property tests), normalisation, core-identical
conditioning for plain text, weights, truncation, statistics."""
from __future__ import annotations

import subprocess
import sys
import types

import comfyui_zimage
import pytest
import torch
from comfyui_zimage.nodes import chinese_text as ct
from comfyui_zimage.nodes import prompt_syntax as ps
from comfyui_zimage.nodes.loader import ZImageCheckpointLoader
from hypothesis import assume, given, settings
from hypothesis import strategies as st

SYNTAX = set("()（）\\\"“”「」『』")


def joined(segments) -> str:
    return "".join(s.text for s in segments)


# ---------------------------------------------------------------------------------------------------
# Parser.

@given(st.text())
@settings(max_examples=500, deadline=None)
def test_parser_never_crashes_on_any_unicode(text):
    segments = ps.parse(text)
    assert all(isinstance(s.text, str) and s.text and s.weight >= 0 for s in segments)
    ps.normalise_segments(segments)


@given(st.text().filter(lambda t: not (set(t) & SYNTAX)))
@settings(max_examples=300, deadline=None)
def test_plain_text_round_trips(text):
    segments = ps.parse(text)
    assert joined(segments) == text
    assert all(s.weight == 1.0 and not s.quoted for s in segments)


WORD = st.text(alphabet=st.sampled_from("汉服红色圆形abcXYZ 12"), min_size=1, max_size=6).filter(lambda t: t.strip())
WEIGHT = st.floats(min_value=0.1, max_value=3.0).map(lambda w: round(w, 2))


@given(WORD, WORD, WORD, WEIGHT, WEIGHT, st.booleans())
@settings(max_examples=200, deadline=None)
def test_nested_spans_multiply(a, b, c, outer, inner, full_width):
    o, cl, colon = ("（", "）", "：") if full_width else ("(", ")", ":")
    assume(not (full_width and c.rstrip()[-1:].isdigit()))  # （比分 3：1） is a score, not a weight
    segments = ps.parse(f"{a}{o}{b}{o}{c}{colon}{inner}{cl}{colon}{outer}{cl}")
    assert joined(segments) == a + b + c
    expected = [1.0] * len(a) + [outer] * len(b) + [outer * inner] * len(c)
    assert ps.char_weights(segments) == pytest.approx(expected)


@pytest.mark.parametrize("text, expected", [
    ("(汉服:1.3)，古风", [("汉服", 1.3), ("，古风", 1.0)]),
    ("（汉服：1.3）女孩", [("汉服", 1.3), ("女孩", 1.0)]),
    ("((红色))圆形", [("红色", 1.21), ("圆形", 1.0)]),
    ("汉服（明制）", [("汉服（明制）", 1.0)]),  # a bare full-width bracket is Chinese text, not a weight
    (r"\(literal\) text", [("(literal) text", 1.0)]),
    ("(unclosed", [("(unclosed", 1.0)]),
    ("（a:x）", [("（a:x）", 1.0)]),
    ("（画幅比例 16：9）", [("（画幅比例 16：9）", 1.0)]),  # a ratio in Chinese brackets is text
    ("（比分：5）", [("（比分：5）", 1.0)]),  # above 3: not a weight in full-width brackets
    ("(ratio 16:9)", [("ratio 16", 9.0)]),  # ASCII brackets keep core's reading
])
def test_parser_table(text, expected):
    assert [(s.text, pytest.approx(s.weight)) for s in ps.parse(text)] == expected


def test_quoted_text_is_kept_intact_through_weighting_and_normalisation():
    for quote in ("“早安(中国:2)　ＡＢ”", '"早安(中国:2)　ＡＢ"', "「早安(中国:2)　ＡＢ」", "『早安(中国:2)　ＡＢ』"):
        segments = ps.normalise_segments(ps.parse(f"(招牌上写着{quote}:1.2)"))
        assert joined(segments) == f"招牌上写着{quote}"
        quoted = [s for s in segments if s.quoted]
        assert len(quoted) == 1 and quoted[0].text == quote and quoted[0].weight == pytest.approx(1.2)


# ---------------------------------------------------------------------------------------------------
# Normalisation.

@pytest.mark.parametrize("text, expected", [
    ("一只ＲＥＤ狐狸，２０２４年", "一只RED狐狸，2024年"),
    ("ｚ－ｉｍａｇｅ　１２３  红色  圆形", "z-image 123 红色圆形"),
    ("  red   circle\n\n\nblue  ", "red circle\nblue"),
    ("古风少女，汉服：“春眠不觉晓”。", "古风少女，汉服：“春眠不觉晓”。"),  # Chinese punctuation stays
    ("藍色背景上的紅色圓形", "藍色背景上的紅色圓形"),  # traditional Chinese unchanged
    ("赛博朋克 城市 夜景, neon lights", "赛博朋克城市夜景, neon lights"),
    ("「東京」的 霓虹  灯", "「東京」的霓虹灯"),
    ("a cat, 4k, ｕｌｔｒａ ｄｅｔａｉｌｅｄ", "a cat, 4k, ultra detailed"),
])
def test_normalisation_on_real_prompts(text, expected):
    assert joined(ps.normalise_segments(ps.parse(text))) == expected


# ---------------------------------------------------------------------------------------------------
# Encoding with the nano text encoder.

@pytest.fixture(scope="module")
def clip():
    comfyui_zimage.register_model_folders()
    return ZImageCheckpointLoader.execute("diffusion_models/nano_zimage_turbo.safetensors", "nano_qwen3.safetensors",
                                          "nano_ae.safetensors", "default", "default").result[1]


def core(clip, text):
    """What core CLIPTextEncode does."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and x[1].keys() == y[1].keys() and all(
        torch.equal(x[1][k], y[1][k]) if isinstance(x[1][k], torch.Tensor) else x[1][k] == y[1][k] for k in x[1])
        for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("text", ["蓝色背景上的红色圆形", "a red circle on a blue background", "左边的绿色正方形，黑色背景",
                                  "", "藍色背景上的紅色圓形", "招牌上写着“早安中国”"])
def test_plain_text_conditioning_is_identical_to_core(clip, text):
    conditioning, stats = ct.encode(clip, text)
    assert same(conditioning, core(clip, text))
    assert stats["text"] == text and not stats["truncated"] and stats["spans"] == []
    assert stats["tokens"] == (0 if not text else len(clip.tokenize(text)["qwen3_4b"][0]) - len(clip.tokenize("")["qwen3_4b"][0]))


def test_weight_one_is_the_plain_prompt_and_weights_move_only_their_tokens(clip):
    plain, _ = ct.encode(clip, "蓝色背景上的红色圆形")
    one, _ = ct.encode(clip, "蓝色背景上的(红色:1.0)圆形")
    assert same(one, plain)
    heavy, stats = ct.encode(clip, "蓝色背景上的(红色:1.6)圆形")
    assert stats["spans"] == [{"text": "红色", "weight": 1.6}]
    changed = (heavy[0][0] - plain[0][0]).abs().amax(-1)[0]
    moved = changed.nonzero().flatten().tolist()
    assert len(moved) == 1, "only the token of 红色 changes"
    ids = [t for t, _ in clip.tokenize("蓝色背景上的红色圆形")["qwen3_4b"][0]]
    assert clip.tokenizer.qwen3_4b.tokenizer.decode([ids[moved[0]]]) == "红色"
    assert torch.isfinite(heavy[0][0]).all()
    assert stats["c_text"] > ct.encode(clip, "蓝色背景上的红色圆形")[1]["c_text"]


@pytest.mark.parametrize("text, span", [("a photo of a (red:1.5) car", "red"), ("穿着汉服的(女孩:1.5)", "女孩")])
def test_a_weight_reaches_tokens_that_bpe_joins_to_a_space_or_a_neighbour(clip, text, span):
    """BPE joins " red" and 的女孩 into one token each; the weight must still land on it."""
    plain_text = text.replace(f"({span}:1.5)", span)
    plain, _ = ct.encode(clip, plain_text)
    heavy, _ = ct.encode(clip, text)
    moved = (heavy[0][0] - plain[0][0]).abs().amax(-1)[0].nonzero().flatten().tolist()
    ids = [t for t, _ in clip.tokenize(plain_text)["qwen3_4b"][0]]
    decoded = "".join(clip.tokenizer.qwen3_4b.tokenizer.decode([ids[i]]) for i in moved)
    assert moved and span in decoded


def test_long_prompts_are_cut_at_512_tokens_and_say_what_was_cut(clip):
    text = "，".join(f"第{i}个红色圆形" for i in range(200)) + "，结尾的蓝色星形"
    conditioning, stats = ct.encode(clip, text)
    assert stats["truncated"] and stats["tokens"] == 512
    uncut = len(clip.tokenize(text)["qwen3_4b"][0]) - len(clip.tokenize("")["qwen3_4b"][0])
    assert stats["prompt_tokens"] == uncut > 512
    assert stats["cut_text"] and text.endswith(stats["cut_text"]) and "结尾的蓝色星形" in stats["cut_text"]
    assert conditioning[0][0].shape[1] == 512 + len(clip.tokenize("")["qwen3_4b"][0])


def test_raw_template_and_statistics(clip):
    raw, stats = ct.encode(clip, "红色圆形", template="raw")
    assert raw[0][0].shape[1] == stats["tokens"] == stats["total_tokens"]
    assert ct.prepare(clip, "", template="raw")[2]["tokens"] == 0
    try:  # nothing for Qwen to read: older core's encoder answers NaN, which must be named, newer core a finite pad
        empty, _ = ct.encode(clip, "", template="raw")
    except ct.TextEncodeError as e:
        assert "empty prompt with the raw template" in str(e)
    else:
        assert torch.isfinite(empty[0][0]).all()
    _, stats = ct.encode(clip, "(招牌:1.5)上写着“早安中国”和「晚安」")
    assert stats["quotes"] == ["早安中国", "晚安"]
    assert stats["spans"] == [{"text": "招牌", "weight": 1.5}]


def test_a_clip_that_is_not_qwen_is_refused():
    with pytest.raises(ct.TextEncodeError, match="not Z-Image's Qwen3"):
        ct.encode(types.SimpleNamespace(tokenizer=types.SimpleNamespace()), "红色")


@pytest.mark.parametrize("text", ["(" * 100_000, "（" * 50_000 + ")" * 50_000, "“" * 100_000,
                                  "(" * 30_000 + "a" + ")" * 30_000, "\\(" * 50_000, "(a:1.2" * 20_000])
def test_the_parser_is_linear_and_never_recurses(text):
    """Brackets that never close, 30 000 levels of nesting, quotes that never close: each parsed at once."""
    import time

    start = time.perf_counter()
    segments = ps.parse(text)
    assert time.perf_counter() - start < 2.0
    assert sum(len(s.text) for s in segments) <= len(text)


def test_nesting_that_multiplies_past_the_maximum_weight_is_refused_with_a_message():
    deep = "(" * 8000 + "汉服" + ")" * 8000  # 1.1 ** 8000 overflows
    assert ps.parse(deep)[0].weight == float("inf")
    with pytest.raises(ct.TextEncodeError, match="multiply to inf"):
        ct.prepare(ct.TokenizerOnly(), deep)
    # 1.1 ** 1000 is finite in float64, but not once the text encoder's fp32 numbers are scaled by it.
    with pytest.raises(ct.TextEncodeError, match=r"multiply to 2\.47e\+41.*above 100"):
        ct.prepare(ct.TokenizerOnly(), "(" * 1000 + "汉服" + ")" * 1000)
    ct.prepare(ct.TokenizerOnly(), "(汉服:100)")  # the maximum itself is allowed


def test_a_prompt_far_longer_than_z_image_reads_is_refused_before_any_work():
    with pytest.raises(ct.TextEncodeError, match="at most 20,000"):
        ct.prepare(ct.TokenizerOnly(), "猫" * 20_001)


def test_a_lone_surrogate_is_refused_with_a_message_not_a_tokenizer_type_error():
    with pytest.raises(ct.TextEncodeError, match="lone UTF-16 surrogate"):
        ct.prepare(ct.TokenizerOnly(), "蓝色\ud800背景")


def test_the_checks_that_need_no_tokenizer_answer_a_sentence_or_none():
    assert "at most 20,000" in ps.text_problem("猫" * 20_001) and ps.text_problem("猫" * 20_000) is None
    assert "lone UTF-16 surrogate" in ps.text_problem("蓝色\ud800背景")
    assert "multiply to inf" in ps.weight_problem(ps.parse("(" * 8000 + "汉服" + ")" * 8000))
    assert ps.weight_problem(ps.parse("(汉服:100)")) is None


def test_the_prompt_syntax_needs_no_comfyui_and_no_torch():
    """prompt_syntax.py is plain text work: it loads on its own, without ComfyUI, the plugin or torch."""
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('prompt_syntax', sys.argv[1]); "
            "module = importlib.util.module_from_spec(spec); sys.modules['prompt_syntax'] = module; "
            "spec.loader.exec_module(module); "
            "loaded = [n for n in sys.modules if n.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'torch')]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code, ps.__file__], check=True)


def test_a_text_encoder_computing_nan_is_named_not_a_black_image(clip):
    norm = clip.cond_stage_model.qwen3_4b.transformer.model.layers[0].input_layernorm.weight  # Z-Image reads layer -2
    saved = norm.detach().clone()
    with torch.no_grad():
        norm.fill_(float("nan"))
    try:
        with pytest.raises(ct.TextEncodeError, match="text encoder produced NaN.*fp16"):
            ct.encode(clip, "蓝色背景上的红色圆形")
    finally:
        with torch.no_grad():
            norm.copy_(saved)
    assert torch.isfinite(ct.encode(clip, "蓝色背景上的红色圆形")[0][0][0]).all()
