"""The API client (`python -m zimage_client submit`): flags set nodes found by type and wiring; runs, batches,
resumes and error exit codes against a real ComfyUI server (Ctrl-C: test_submit_interrupt.py; groups, the
manifest and UI-format workflows without a server: test_submit_groups.py)."""
from __future__ import annotations

import json
import threading
import time

import pytest
from PIL import Image
from zimage_testing.helpers import REPO_ROOT

from zimage_client import submit
from zimage_client.comfy_api import ComfyClient

TURBO = REPO_ROOT / "workflows" / "api" / "zimage-turbo.json"
BASE = REPO_ROOT / "workflows" / "api" / "zimage-base.json"


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_options_land_on_the_nodes_wired_to_the_sampler():
    base = load(BASE)
    out = submit.apply_options(base, text="白色背景上的三个黄色星形", negative="模糊", seed=9, width=96, height=64, steps=5,
                               model="diffusion_models/other.safetensors")
    sampler = next(n for n in out.values() if n["class_type"] == "KSampler")
    positive, negative = out[sampler["inputs"]["positive"][0]], out[sampler["inputs"]["negative"][0]]
    assert positive["inputs"]["text"] == "白色背景上的三个黄色星形" and negative["inputs"]["text"] == "模糊"
    assert sampler["inputs"]["seed"] == 9 and sampler["inputs"]["steps"] == 5
    latent = next(n for n in out.values() if n["class_type"] == "EmptySD3LatentImage")
    assert (latent["inputs"]["width"], latent["inputs"]["height"]) == (96, 64)
    loader = next(n for n in out.values() if n["class_type"] == "ZImageCheckpointLoader")
    assert loader["inputs"]["model"] == "diffusion_models/other.safetensors"
    assert base == load(BASE), "the loaded workflow itself is not changed"


def test_options_with_nowhere_to_go_are_clear_errors():
    with pytest.raises(submit.WorkflowError, match="negative"):
        submit.apply_options(load(TURBO), negative="模糊")  # turbo's negative is ConditioningZeroOut
    with pytest.raises(submit.WorkflowError, match="no KSampler"):
        submit.apply_options({"1": {"class_type": "LoadImage", "inputs": {}}}, seed=1)


def test_submit_writes_images_and_a_second_run_is_skipped(server, tmp_path, capsys):
    args = [str(TURBO), "--server", server.url, "--prompt", "黑色背景上的绿色正方形", "--seed", "3", "--out", str(tmp_path),
            "--quiet"]
    assert submit.main(args) == 0
    images = sorted(tmp_path.glob("*.png"))
    sizes = sorted(Image.open(path).size for path in images)
    assert sizes[0] == (128, 128) and sizes[1][0] > 500 and len(sizes) == 2  # the picture and the k_gen plot
    assert submit.main(args) == 0  # resumable: the same run is already there
    assert sorted(tmp_path.glob("*.png")) == images


def test_batch_mode_runs_every_line_with_bounded_concurrency_and_prints_a_summary(server, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("蓝色背景上的红色圆形\n\nthree yellow stars on a white background\n左边的绿色正方形，黑色背景\n",
                       encoding="utf-8")
    out = tmp_path / "out"
    code = submit.main([str(TURBO), "--server", server.url, "--prompts-file", str(prompts), "--concurrency", "2",
                        "--out", str(out), "--quiet"])
    assert code == 0
    assert len(list(out.glob("*.png"))) == 3 * 2  # each run's picture and k_gen plot
    assert len(list(out.glob("003_左边的绿色正方形-黑色背景_*.png"))) == 2  # named after the run and its prompt
    captured = capsys.readouterr()
    assert "| 3 | 左边的绿色正方形，黑色背景 | done | 2 |" in captured.out
    assert "| # | prompt | status | files | queue wait s | run s | k_gen |" in captured.out
    assert captured.err.count("the server runs them one at a time") == 1  # --concurrency only queues
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in records] == ["蓝色背景上的红色圆形", "three yellow stars on a white background",
                                              "左边的绿色正方形，黑色背景"]


def test_rejected_workflow_prints_node_errors_and_exits_2(server, tmp_path, capsys):
    code = submit.main([str(TURBO), "--server", server.url, "--steps", "0", "--out", str(tmp_path), "--quiet"])
    assert code == submit.EXIT_REJECTED
    err = capsys.readouterr().err
    assert "rejected" in err and "node 6 (KSampler) steps" in err


def test_unreachable_server_exits_3(tmp_path, capsys):
    code = submit.main([str(TURBO), "--server", "http://127.0.0.1:9", "--out", str(tmp_path), "--quiet"])
    assert code == submit.EXIT_UNREACHABLE
    assert "cannot be reached" in capsys.readouterr().err


def test_timeout_exits_5_and_interrupt_exits_4(server, tmp_path, capsys):
    slow = [str(TURBO), "--server", server.url, "--steps", "400", "--size", "256", "--out", str(tmp_path), "--quiet"]
    assert submit.main(slow + ["--seed", "11", "--timeout", "0.5"]) == submit.EXIT_TIMEOUT
    ComfyClient(server.url).interrupt()  # stop the run the timed-out client left behind
    time.sleep(1.0)

    def interrupt_soon():
        time.sleep(2.0)
        ComfyClient(server.url).interrupt()

    threading.Thread(target=interrupt_soon, daemon=True).start()
    assert submit.main(slow + ["--seed", "12"]) == submit.EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err
