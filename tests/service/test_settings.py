"""The settings every process reads (ZIMAGE_SERVE_*): a RabbitMQ broker and its result backend are configuration
only, separate from the Redis that keeps the job records; a child process gets the same settings back."""
from __future__ import annotations

from pathlib import Path

from zimage_testing import service_env

service_env.require()  # skips, saying why, before the service's packages are imported

from zimage_serve import config  # noqa: E402
from zimage_serve.tasks import make_app  # noqa: E402


def test_broker_and_result_backend_are_separate_settings():
    settings = config.load({"ZIMAGE_SERVE_REDIS_URL": "redis://10.0.0.1:6379/0",
                            "ZIMAGE_SERVE_BROKER_URL": "amqp://guest:guest@10.0.0.2:5672//",
                            "ZIMAGE_SERVE_RESULT_BACKEND": "rpc://"})
    app = make_app(settings)
    assert app.conf.broker_url == "amqp://guest:guest@10.0.0.2:5672//" and app.conf.result_backend == "rpc://"
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost and app.conf.worker_prefetch_multiplier == 1
    redis_only = make_app(config.load({"ZIMAGE_SERVE_REDIS_URL": "redis://10.0.0.1:6379/3"}))
    assert redis_only.conf.broker_url == redis_only.conf.result_backend == "redis://10.0.0.1:6379/3"


def test_settings_reach_a_child_process_unchanged(tmp_path):
    settings = config.load({}, data_dir=tmp_path, jwt_secret_file=tmp_path / "secret", jobs_per_minute=7, job_timeout=12.5)
    again = config.load(settings.env())
    assert again == settings and again.jwt_public_key_file is None and again.data_dir == Path(tmp_path)
    assert settings.visibility == 72  # longer than a job may run, so a running job is not delivered twice
