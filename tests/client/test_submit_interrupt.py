"""Ctrl-C on `python -m zimage_client submit`: a real SIGINT to a real client process against the real server.

The first Ctrl-C stops queueing, takes back from the server what this client queued (interrupting the running
prompt only when it is this client's), prints the summary and exits 4; a second exits at once; a rerun resumes."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from zimage_testing.helpers import REPO_ROOT

from zimage_client import submit

TURBO = REPO_ROOT / "workflows" / "api" / "zimage-turbo.json"


def start_client(server, tmp_path, prompts: list[str], *options: str, name: str = "batch") -> subprocess.Popen:
    path = tmp_path / f"{name}.txt"
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "zimage_client", "submit", str(TURBO), "--server", server.url, "--prompts-file", str(path),
           "--out", str(tmp_path / "out"), *options]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def queue_ids(client) -> tuple[list[str], list[str]]:
    queue = client.queue()
    return [e[1] for e in queue["queue_running"]], [e[1] for e in queue["queue_pending"]]


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")


def manifest(tmp_path) -> list[dict]:
    path = tmp_path / "out" / submit.MANIFEST
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def finish(proc: subprocess.Popen, seconds: float) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=seconds)
    return proc.returncode, out, err


def test_ctrl_c_cancels_this_clients_prompts_prints_the_summary_exits_4_and_a_rerun_resumes(server, client, tmp_path):
    prompts = ["蓝色背景上的红色圆形", "三个黄色星形", "左边的绿色正方形"]
    slow = ("--steps", "40", "--size", "256", "--seed", "21", "--concurrency", "2")  # a few seconds a run, or more
    proc = start_client(server, tmp_path, prompts, *slow)
    try:
        wait_for(lambda: any(r["status"] == "done" for r in manifest(tmp_path)), 300, "the first run to finish")
        wait_for(lambda: queue_ids(client)[0], 60, "the next run to be running")
        proc.send_signal(signal.SIGINT)
        code, out, err = finish(proc, 90)
    finally:
        proc.kill()
    assert code == submit.EXIT_INTERRUPTED, out + err
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in err
    assert "| # | prompt | status | files | queue wait s | run s | k_gen |" in out
    assert "| 1 | 蓝色背景上的红色圆形 | done | 2 |" in out
    assert "| 3 | 左边的绿色正方形 | done |" not in out, "Ctrl-C came while a run was running; the last cannot be done"
    assert "interrupted the running one" in err and "stopped by Ctrl-C" in err, err
    assert queue_ids(client) == ([], []), "the client left a prompt on the server"
    statuses = [r["status"] for r in sorted(manifest(tmp_path), key=lambda r: r["run"])]
    assert statuses[0] == "done" and "interrupted" in statuses and set(statuses) <= {"done", "interrupted", "cancelled"}
    done_before = statuses.count("done")

    rerun = start_client(server, tmp_path, prompts, *slow)
    code, out, err = finish(rerun, 600)
    assert code == 0, out + err
    assert out.count("| skipped | 2 |") == done_before and out.count("| done | 2 |") == len(prompts) - done_before
    records = sorted(manifest(tmp_path), key=lambda r: r["run"])
    assert [(r["run"], r["status"]) for r in records] == [(1, "done"), (2, "done"), (3, "done")]
    for record, text in zip(records, prompts, strict=True):
        assert record["prompt"] == text and record["seed"] == 21 and record["workflow"] == str(TURBO)
        assert record["run_seconds"] > 0 and record["queue_seconds"] >= 0 and record["k_gen"]["nfe"] > 0
        assert len(record["files"]) == 2 and all(f.startswith(f"00{record['run']}_{text}_{record['key']}_")
                                                 for f in record["files"])
        assert all((tmp_path / "out" / f).is_file() for f in record["files"])


def test_ctrl_c_leaves_another_clients_running_prompt_alone(server, client, tmp_path):
    foreign = client.queue_prompt(submit.apply_options(json.loads(TURBO.read_text(encoding="utf-8")), seed=31,
                                                       steps=400, width=256, height=256))
    try:
        wait_for(lambda: queue_ids(client)[0] == [foreign], 60, "the other client's prompt to run")
        proc = start_client(server, tmp_path, ["红色圆形", "绿色正方形"], "--steps", "2", "--concurrency", "2")
        try:
            wait_for(lambda: len(queue_ids(client)[1]) == 2, 60, "this client's prompts to wait in the queue")
            proc.send_signal(signal.SIGINT)
            code, out, err = finish(proc, 60)
        finally:
            proc.kill()
        assert code == submit.EXIT_INTERRUPTED, out + err
        assert "Traceback" not in out + err and "| 2 | 绿色正方形 | cancelled |" in out
        assert queue_ids(client) == ([foreign], []), "only this client's prompts go; the other one still runs"
    finally:
        client.cancel([foreign])
        wait_for(lambda: queue_ids(client) == ([], []), 120, "the other client's prompt to stop")


def test_a_second_ctrl_c_exits_at_once_and_still_takes_the_prompts_back(server, client, tmp_path):
    proc = start_client(server, tmp_path, ["红色圆形", "绿色正方形"], "--steps", "400", "--size", "256", "--seed", "41",
                        "--concurrency", "2")
    try:
        wait_for(lambda: (q := queue_ids(client))[0] and q[1], 60, "the batch to be running")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        code, out, err = finish(proc, 30)
        seconds = time.monotonic() - started
    finally:
        proc.kill()
    assert code == submit.EXIT_INTERRUPTED and seconds < 10, out + err
    assert "Traceback" not in out + err and "stopped at once" in err
    wait_for(lambda: queue_ids(client) == ([], []), 60, "the server to drop the batch's prompts")
