"""The client's workflow logic without a server: conditioning followed through conditioning nodes to the text
encoders, groups named by title prefixes, UI-format workflows refused with their API twin, the manifest and the
file names a batch writes, and progress lines named by node title."""
from __future__ import annotations

import io
import json

import pytest
from zimage_testing.helpers import REPO_ROOT

from zimage_client import submit

EDIT = REPO_ROOT / "workflows" / "api" / "zimage-edit.json"
TURBO_UI = REPO_ROOT / "workflows" / "zimage-turbo.json"


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def node(class_type, title=None, **inputs):
    n = {"class_type": class_type, "inputs": inputs}
    if title is not None:
        n["_meta"] = {"title": title}
    return n


def two_groups(first="Edit", second="Inpaint") -> dict:
    """Two independent samplers: the first's conditioning goes through ReferenceLatent (as in zimage-edit), the
    second's negative is ConditioningZeroOut of its positive."""
    a, b = (f"{first}: " if first else ""), (f"{second}: " if second else "")
    return {
        "1": node("ZImageCheckpointLoader", f"{a}Loader"),
        "2": node("ZImageChineseTextEncode", f"{a}Instruction", text="old instruction", clip=["1", 1]),
        "3": node("CLIPTextEncode", f"{a}Negative", text="old negative", clip=["1", 1]),
        "4": node("ReferenceLatent", f"{a}Reference (positive)", conditioning=["2", 0], latent=["9", 0]),
        "5": node("ReferenceLatent", f"{a}Reference (negative)", conditioning=["3", 0], latent=["9", 0]),
        "6": node("KSampler", f"{a}KSampler", seed=1, steps=["1", 3], positive=["4", 0], negative=["5", 0]),
        "11": node("ZImageChineseTextEncode", f"{b}What goes in the hole", text="old hole", clip=["1", 1]),
        "12": node("ConditioningZeroOut", f"{b}Negative (not used)", conditioning=["11", 0]),
        "13": node("KSampler", f"{b}KSampler", seed=2, steps=4, positive=["11", 0], negative=["12", 0]),
    }


def texts(prompt):
    return {k: n["inputs"]["text"] for k, n in prompt.items() if "text" in n["inputs"]}


def test_conditioning_is_followed_through_conditioning_nodes_and_stops_at_a_zeroed_negative():
    w = two_groups()
    encoders, zeroed = submit.conditioning_sources(w, w["6"], "negative")
    assert encoders == [w["3"]] and not zeroed
    encoders, zeroed = submit.conditioning_sources(w, w["13"], "negative")
    assert encoders == [] and zeroed == [w["12"]]  # not the positive encoder behind the zero-out
    # combining nodes (conditioning_1/_2) and positive/negative pairs (ControlNetApplyAdvanced) are followed too
    w["20"] = node("ConditioningSetArea", conditioning=["2", 0], width=64)
    w["21"] = node("ConditioningCombine", conditioning_1=["20", 0], conditioning_2=["3", 0])
    w["22"] = node("ControlNetApplyAdvanced", positive=["21", 0], negative=["3", 0], control_net=["1", 0])
    w["6"]["inputs"].update(positive=["22", 0], negative=["22", 1])
    assert submit.conditioning_sources(w, w["6"], "positive")[0] == [w["2"], w["3"]]
    assert submit.conditioning_sources(w, w["6"], "negative")[0] == [w["3"]]


def test_group_is_the_title_prefix_and_the_first_group_is_the_default():
    assert submit.group_of(node("KSampler", "Edit: KSampler")) == "edit"
    assert submit.group_of(node("KSampler", "Inpaint: KSampler")) == "inpaint"
    assert submit.group_of(node("KSampler", "KSampler")) == "" and submit.group_of(node("KSampler")) == ""
    w = two_groups()
    assert list(submit.sampler_groups(w)) == ["edit", "inpaint"]
    out = submit.apply_options(w, text="新指令", negative="模糊", seed=7, steps=3)
    assert texts(out) == {"2": "新指令", "3": "模糊", "11": "old hole"}  # only the first group, through ReferenceLatent
    assert (out["6"]["inputs"]["seed"], out["6"]["inputs"]["steps"]) == (7, 3)
    assert (out["13"]["inputs"]["seed"], out["13"]["inputs"]["steps"]) == (2, 4)
    note = submit.group_note(w, None)
    assert note.startswith("note:") and '"edit"' in note and '"inpaint"' in note and "--group" in note
    assert "\n" not in note and submit.group_note(w, "edit") is None


def test_group_option_addresses_the_other_group_and_an_unknown_one_lists_the_groups():
    w = two_groups()
    out = submit.apply_options(w, text="一个绿色圆形", seed=5, group="Inpaint")
    assert texts(out) == {"2": "old instruction", "3": "old negative", "11": "一个绿色圆形"}
    assert out["13"]["inputs"]["seed"] == 5 and out["6"]["inputs"]["seed"] == 1
    with pytest.raises(submit.WorkflowError, match=r'zeroed \(ConditioningZeroOut\).*--negative'):
        submit.apply_options(w, negative="模糊", group="inpaint")
    with pytest.raises(submit.WorkflowError, match=r"no group 'outpaint'.*\"edit\", \"inpaint\""):
        submit.apply_options(w, text="x", group="outpaint")
    assert submit.describe(out, "inpaint") == {"prompt": "一个绿色圆形", "negative": None, "seed": 5, "group": "inpaint"}


def test_a_single_group_workflow_has_no_note_and_every_sampler_is_addressed():
    w = two_groups(first="", second="")
    assert list(submit.sampler_groups(w)) == [""] and submit.group_note(w, None) is None
    out = submit.apply_options(w, text="t", negative="n")
    assert texts(out) == {"2": "t", "3": "n", "11": "t"}  # the zeroed negative has no text; the other takes it
    with pytest.raises(submit.WorkflowError, match="no group 'edit'.*no prefix"):
        submit.apply_options(w, text="t", group="edit")


def test_the_bundled_edit_workflow_is_addressed_through_its_reference_latents():
    w = load(EDIT)
    groups = submit.sampler_groups(w)
    edit_sampler = next(iter(groups.values()))[0][1]
    positive, _ = submit.conditioning_sources(w, edit_sampler, "positive")
    negative, _ = submit.conditioning_sources(w, edit_sampler, "negative")
    assert [e["class_type"] for e in positive] == ["ZImageChineseTextEncode"]
    assert positive[0]["_meta"]["title"].lower().endswith("instruction")  # "Instruction" or "Edit: instruction"
    assert wired_through(w, edit_sampler, "positive") == "ReferenceLatent"
    out = submit.apply_options(w, text="把红色圆形改成蓝色", negative="模糊")  # no longer exit 2 for --negative
    assert out[_id(w, positive[0])]["inputs"]["text"] == "把红色圆形改成蓝色"
    assert out[_id(w, negative[0])]["inputs"]["text"] == "模糊"
    if len(groups) > 1:  # titled by group: the inpainting prompt is left alone without --group inpaint
        hole = next(k for k, n in w.items() if n["_meta"]["title"].lower().endswith("what goes in the hole"))
        assert out[hole]["inputs"]["text"] == w[hole]["inputs"]["text"]
        assert list(groups) == ["edit", "inpaint"]


def wired_through(prompt, sampler, role):
    return submit.wired(prompt, sampler, role)["class_type"]


def _id(prompt, n):
    return next(k for k, v in prompt.items() if v is n)


def test_a_ui_workflow_exits_2_naming_its_api_twin(tmp_path, capsys):
    code = submit.main([str(TURBO_UI), "--server", "http://127.0.0.1:9", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == submit.EXIT_REJECTED and "Traceback" not in err
    assert "UI workflow" in err and str(REPO_ROOT / "workflows" / "api" / "zimage-turbo.json") in err
    lonely = tmp_path / "mine.json"  # no API twin beside it
    lonely.write_text(TURBO_UI.read_text(encoding="utf-8"), encoding="utf-8")
    assert submit.main([str(lonely), "--out", str(tmp_path / "out")]) == submit.EXIT_REJECTED
    assert "Export (API)" in capsys.readouterr().err


def test_file_names_map_to_the_prompt_and_keep_the_resume_key(tmp_path):
    assert submit.slug("蓝色背景上的红色圆形, big!") == "蓝色背景上的红色圆形-big"
    assert submit.slug("  ") == "workflow" and len(submit.slug("x" * 100)) == 24
    assert submit.file_prefix(3, 12, "Three yellow stars") == "003_three-yellow-stars"
    (tmp_path / "003_three-yellow-stars_0123456789ab_zimage_00001_.png").write_bytes(b"")
    (tmp_path / "0123456789ab_old-name.png").write_bytes(b"")  # named before prefixes
    (tmp_path / "004_other_ba9876543210_zimage_00002_.png").write_bytes(b"")
    assert [p.name for p in submit.existing_files(tmp_path, "0123456789ab")] == [
        "003_three-yellow-stars_0123456789ab_zimage_00001_.png", "0123456789ab_old-name.png"]


def test_the_manifest_keeps_earlier_records_and_a_rerun_updates_its_own(tmp_path):
    manifest = submit.Manifest(tmp_path)
    described = {"prompt": "p", "negative": None, "seed": 1, "group": None}

    def record(key, status, **kw):
        return submit.manifest_record(1, key, described, tmp_path / "w.json", tmp_path, submit.Outcome("p", status, **kw))

    manifest.update(record("a", "done", images=[tmp_path / "001_p_a_x.png"], seconds=2.0, queue_seconds=0.5,
                           k_gen={"k_gen": 1.5, "nfe": 8, "seconds": 5.3, "times_s": [1, 2]}))
    manifest.update(record("b", "interrupted", seconds=1.0))
    manifest.update(record("a", "skipped", images=[tmp_path / "001_p_a_x.png"]))  # no news: the first record stays
    manifest.update(record("b", "done", images=[tmp_path / "002_p_b_x.png"], seconds=3.0))
    records = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["key"], r["status"]) for r in records] == [("a", "done"), ("b", "done")]
    assert records[0]["files"] == ["001_p_a_x.png"] and records[0]["k_gen"] == {"k_gen": 1.5, "nfe": 8, "seconds": 5.3}
    assert (records[0]["queue_seconds"], records[0]["run_seconds"]) == (0.5, 2.0)
    assert records[1]["workflow"] == str(tmp_path / "w.json") and records[1]["seed"] == 1


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_names_the_node_by_title_and_keeps_one_line_per_run():
    prompt = {"6": node("KSampler", "Edit: KSampler"), "7": node("ZImageTiledVAEDecode")}
    term = Terminal()
    progress = submit.Progress(quiet=False, stream=term)
    show = progress.for_run("1/2 red circle", prompt)
    for value in (1, 2):
        show({"type": "progress", "data": {"node": "6", "value": value, "max": 2}})
    show({"type": "progress", "data": {"node": "7", "value": 1, "max": 1}})
    progress.finish("1/2 red circle", submit.Outcome("red circle", "done", seconds=2.0, queue_seconds=0.5))
    lines = term.getvalue().split("\n")
    assert len(lines) == 2 and lines[1] == ""  # one line, ended once
    frames = lines[0].split("\r")
    assert "Edit: KSampler [" in frames[1] and "ZImageTiledVAEDecode [" in frames[3] and "node 6" not in lines[0]
    assert frames[-1] == "1/2 red circle: done (waited 0.5 s, ran 2.0 s)\x1b[K"  # the rest of the bar cleared
    assert submit.fit("蓝色背景abc", 9) == "蓝色背景a" and submit.fit("abc", 9) == "abc"
    piped = io.StringIO()  # not a terminal: the outcome line only, no bars
    progress = submit.Progress(quiet=False, stream=piped)
    progress.for_run("1/1 x", prompt)({"type": "progress", "data": {"node": "6", "value": 1, "max": 2}})
    progress.finish("1/1 x", submit.Outcome("x", "failed", seconds=1.0))
    assert piped.getvalue() == "1/1 x: failed (waited 0.0 s, ran 1.0 s)\n"
