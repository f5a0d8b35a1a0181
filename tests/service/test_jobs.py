"""jobs.build on malformed requests: each is refused with a WorkflowError (the API's 422), never a 500. No server."""
from __future__ import annotations

import copy

from zimage_testing import service_env

service_env.require()  # skips, saying why, before the service's packages are imported

import pytest  # noqa: E402
from zimage_testing.helpers import REPO_ROOT  # noqa: E402

from zimage_client.submit import WorkflowError, load_workflow  # noqa: E402
from zimage_serve import jobs  # noqa: E402

TURBO = load_workflow(REPO_ROOT / "workflows" / "api" / "zimage-turbo.json")


def turbo() -> dict:
    return copy.deepcopy(TURBO)


def refused(request: dict) -> str:
    with pytest.raises(WorkflowError) as e:
        jobs.build(request)
    message = str(e.value)
    assert message and "\n" not in message
    return message


def latent_id(workflow: dict) -> str:
    return next(i for i, n in workflow.items() if n["class_type"] in ("EmptySD3LatentImage", "EmptyLatentImage"))


def test_a_node_without_an_inputs_object_is_refused():
    workflow = turbo()
    del workflow["6"]["inputs"]
    assert "node 6" in refused({"workflow": workflow})
    workflow["6"]["inputs"] = ["not", "an", "object"]
    assert "node 6" in refused({"workflow": workflow})


def test_meta_that_is_not_an_object_is_refused():
    workflow = turbo()
    workflow["6"]["_meta"] = "KSampler"
    assert "_meta" in refused({"workflow": workflow})


def test_a_size_on_a_latent_without_width_or_height_is_refused():
    workflow = turbo()
    del workflow[latent_id(workflow)]["inputs"]["height"]
    assert "height" in refused({"workflow": workflow, "width": 256})
    assert "height" in refused({"workflow": workflow, "size": 256})
    jobs.build({"workflow": workflow})  # no size asked for: nothing to apply


def test_a_lone_surrogate_is_refused():
    assert "surrogate" in refused({"prompt": "a red circle \ud800"})
    workflow = turbo()
    workflow["6"]["_meta"] = {"title": "\udc00"}
    assert "surrogate" in refused({"workflow": workflow})


def test_an_empty_workflow_is_refused_not_read_as_the_default():
    refused({"workflow": {}})
    refused({"workflow": ""})
    assert jobs.build({"workflow": None})["workflow_name"] == "zimage-turbo"
    assert jobs.build({})["workflow_name"] == "zimage-turbo"


def test_starting_a_job_is_a_compare_and_set(tmp_path):
    """Two deliveries of one job: only one starts it; a take-over only while the record is what was seen stale."""
    import redis

    from zimage_client.server import free_port
    from zimage_serve import processes

    port = free_port()
    server = processes.start_redis(tmp_path / "redis", port)
    try:
        r = redis.Redis(port=port, decode_responses=True)
        jobs.create(r, tmp_path / "logs", {"id": "j1", "state": "queued", "queued": 1.0, "subject": "s"})
        assert r.zscore(jobs.QUEUED_SET, "j1") is not None
        first = jobs.change(r, tmp_path / "logs", "j1", ("queued",), "running", worker="w0", heartbeat=10.5)
        assert first["worker"] == "w0" and r.zscore(jobs.QUEUED_SET, "j1") is None  # out of the queued set at once
        assert jobs.change(r, tmp_path / "logs", "j1", ("queued",), "running", worker="w1") is None  # not queued now
        stale = {"worker": "w0", "heartbeat": 10.5}
        jobs.update(r, "j1", heartbeat=11.25)  # w0 is alive after all
        assert jobs.change(r, tmp_path / "logs", "j1", ("running",), "running", expect=stale, worker="w1") is None
        stale["heartbeat"] = 11.25
        taken = jobs.change(r, tmp_path / "logs", "j1", ("running",), "running", expect=stale, worker="w1")
        assert taken["worker"] == "w1" and taken["id"] == "j1"
        assert jobs.change(r, tmp_path / "logs", "j1", ("running",), "running", expect=stale, worker="w2") is None
    finally:
        processes.stop(server)
