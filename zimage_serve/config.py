"""One frozen settings object, read from the environment (ZIMAGE_SERVE_*) with command-line overrides.

Every process of the service (API, workers, `up`) reads the same variables, so `up` starts its children by
handing them an environment, and a worker on another host needs only the same variables."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

PREFIX = "ZIMAGE_SERVE_"


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"  # job records, quotas and the cache
    broker_url: str = ""  # Celery's broker; empty: redis_url (amqp://... for RabbitMQ)
    result_backend: str = ""  # Celery's result store; empty: redis_url (rpc:// with RabbitMQ)
    data_dir: Path = Path("zimage-serve-data")  # everything the service writes goes under here
    jwt_secret_file: Path | None = None  # HS256: a file holding the shared secret
    jwt_public_key_file: Path | None = None  # RS256: the PEM public key that verifies tokens
    jwt_private_key_file: Path | None = None  # RS256: the PEM private key `token` signs with
    jobs_per_minute: int = 60  # per subject
    max_queued: int = 100  # queued or running jobs per subject
    queue_limit: int = 1000  # /readyz answers 503 when more jobs than this wait
    cache_ttl: int = 86400  # seconds a finished job's outputs answer the same request
    job_timeout: float = 900.0  # seconds one ComfyUI run may take
    visibility_timeout: int = 0  # seconds before a job taken by a worker that died is delivered again; 0: job_timeout + 60
    restore_interval: int = 5  # seconds between the broker's checks for such jobs
    heartbeat: float = 2.0  # seconds between a running job's heartbeats in its record
    queue: str = "zimage"
    host: str = "127.0.0.1"
    port: int = 8000
    comfy_url: str = ""  # a worker's ComfyUI

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def backend(self) -> str:
        return self.result_backend or self.redis_url

    @property
    def visibility(self) -> int:
        # Longer than a job may run: a shorter one only delays (the heartbeat stops a second run), never duplicates.
        return self.visibility_timeout or int(self.job_timeout) + 60

    @property
    def stale_after(self) -> float:
        return 4 * self.heartbeat

    @property
    def jobs_dir(self) -> Path:
        return Path(self.data_dir) / "jobs"

    @property
    def log_dir(self) -> Path:
        return Path(self.data_dir) / "logs"

    @property
    def auth_configured(self) -> bool:
        return bool(self.jwt_secret_file or self.jwt_public_key_file)

    def env(self) -> dict[str, str]:
        """These settings as environment variables, for a child process."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[PREFIX + f.name.upper()] = "" if value is None else str(value)
        return out


def convert(name: str, text: str):
    kind = {f.name: f.type for f in fields(Settings)}[name]
    if text == "" and "None" in str(kind):
        return None
    if "Path" in str(kind):
        return Path(text).expanduser()
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    return text


def load(env: dict | None = None, **overrides) -> Settings:
    """Settings from `env` (default os.environ), then `overrides` that are not None."""
    env = os.environ if env is None else env
    values = {}
    for f in fields(Settings):
        key = PREFIX + f.name.upper()
        if key in env:
            try:
                values[f.name] = convert(f.name, env[key])
            except ValueError:
                raise SystemExit(f"{key}={env[key]!r} is not a valid {f.type}") from None
    settings = Settings(**values)
    given = {k: (Path(v) if k.endswith(("_dir", "_file")) and v is not None else v)
             for k, v in overrides.items() if v is not None}
    return replace(settings, **given)
