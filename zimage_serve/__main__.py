"""python -m zimage_serve up | token | worker | api  (docs/serving.md)

    up --workers N      Redis, N headless ComfyUI servers, N Celery workers and the API on this machine;
                        prints a token and the URL; Ctrl-C stops them all
    token --sub NAME    mint a bearer token (--scope generate|admin, --ttl seconds)
    worker --comfy-url  one Celery worker for one ComfyUI (concurrency 1, prefetch 1)
    api                 the HTTP API under uvicorn

Settings come from ZIMAGE_SERVE_* variables (zimage_serve/config.py), options override them."""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from . import config


def common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data-dir", type=Path, help="the service's folder: jobs' images, logs, Redis data, keys")
    ap.add_argument("--redis-url", help="job records, quotas and cache (default redis://127.0.0.1:6379/0)")
    ap.add_argument("--broker-url", help="Celery broker (default: the Redis URL; amqp://... for RabbitMQ)")
    ap.add_argument("--result-backend", help="Celery result store (default: the Redis URL)")
    ap.add_argument("--jwt-secret-file", type=Path, help="HS256 secret")
    ap.add_argument("--jwt-public-key-file", type=Path, help="RS256 public key (PEM) to verify tokens")
    ap.add_argument("--jwt-private-key-file", type=Path, help="RS256 private key (PEM) to mint tokens")


def settings_of(args) -> config.Settings:
    names = ("data_dir", "redis_url", "broker_url", "result_backend", "jwt_secret_file", "jwt_public_key_file",
             "jwt_private_key_file", "host", "port", "comfy_url", "jobs_per_minute", "max_queued", "queue_limit",
             "cache_ttl", "job_timeout")
    settings = config.load(**{n: getattr(args, n, None) for n in names})
    # Children run from the repository's folder: every path is made absolute here, where it was given.
    paths = {n: Path(getattr(settings, n)).expanduser().resolve()
             for n in ("data_dir", "jwt_secret_file", "jwt_public_key_file", "jwt_private_key_file") if getattr(settings, n)}
    return replace(settings, **paths)


def cmd_token(args) -> int:
    from . import auth

    print(auth.mint(settings_of(args), args.sub, args.scope or ["generate"], args.ttl))
    return 0


def cmd_worker(args) -> int:
    settings = settings_of(args)
    if not settings.comfy_url:
        raise SystemExit("a worker needs its ComfyUI: --comfy-url http://127.0.0.1:8188 (or ZIMAGE_SERVE_COMFY_URL)")
    os.environ.update(settings.env())  # tasks.py reads its settings from the environment, in every pool process
    from .tasks import app

    name = args.name or f"worker-{os.getpid()}"
    app.worker_main(["worker", "-n", f"{name}@%h", "--concurrency", "1", "--prefetch-multiplier", "1", "-Q",
                     settings.queue, "--loglevel", args.loglevel, "--without-gossip", "--without-mingle"])
    return 0


def refuse_open_bind(settings: config.Settings) -> None:
    from .processes import is_loopback

    if not is_loopback(settings.host) and not settings.auth_configured:
        raise SystemExit(f"refusing to listen on {settings.host} without a key: give --jwt-secret-file or "
                         "--jwt-public-key-file, or listen on 127.0.0.1")


def cmd_api(args) -> int:
    settings = settings_of(args)
    refuse_open_bind(settings)
    os.environ.update(settings.env())
    import uvicorn

    from .api import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning")
    return 0


def cmd_up(args) -> int:
    from zimage_client.comfy_api import ComfyError
    from zimage_client.server import ComfyServer, free_port

    from . import auth, processes

    settings = settings_of(args)
    refuse_open_bind(settings)
    data = settings.data_dir
    if not settings.auth_configured:
        secret = data / "keys" / "jwt-secret"
        settings = replace(settings, jwt_secret_file=secret if secret.is_file() else auth.new_secret(secret))
    auth.signing_key(settings)  # up prints a token: a key to sign it with must be there before anything starts
    auth.verifying_key(settings)
    models_dir = args.models_dir.expanduser().resolve() if args.models_dir else None
    started = []  # (name, stop function), stopped in reverse
    try:
        if not args.redis_url:
            port = args.redis_port or free_port()
            started.append(("redis", processes.start_redis(data / "redis", port)))
            settings = replace(settings, redis_url=f"redis://127.0.0.1:{port}/0")
        servers = []
        for i in range(args.workers):
            gpu = {"CUDA_VISIBLE_DEVICES": str(i)} if args.gpu_per_worker else {}
            server = ComfyServer(data / "comfyui" / str(i), models_dir=models_dir, cpu=args.cpu)
            started.append((f"comfyui {i}", server))  # before start(): a Ctrl-C while it starts still stops it
            with processes.environment(OMP_NUM_THREADS=args.comfy_threads, **gpu):
                server.start()
            servers.append(server)
            print(f"ComfyUI {i}: {server.url}", flush=True)
        for i, server in enumerate(servers):
            started.append((f"worker {i}", processes.start_worker(settings, server.url, f"w{i}")))
        started.append(("api", processes.start_api(settings)))
        token = auth.mint(settings, "admin", ["generate", "admin"], ttl=args.token_ttl)
        url = f"http://{settings.host}:{settings.port}"
        print(f"\nAPI: {url}  (OpenAPI: {url}/docs)\ndata: {data}\n"
              f"token (subject admin, scopes generate and admin, valid {args.token_ttl / 3600:g} h):\n"
              f"TOKEN={token}\n\ntry:\n"
              f"curl -s -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' "
              f"-d '{{\"prompt\": \"a red circle\", \"seed\": 1}}' {url}/v1/jobs\n\nCtrl-C stops everything.", flush=True)
        while True:
            for name, proc in started:
                process = proc.process if isinstance(proc, ComfyServer) else proc
                if process.poll() is not None:
                    raise processes.StartError(f"{name} exited with code {process.returncode}; stopping the rest")
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("\nstopping", flush=True)
        return 0
    except (processes.StartError, ComfyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for _name, proc in reversed(started):
            if hasattr(proc, "stop"):
                proc.stop()
            else:
                processes.stop(proc)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m zimage_serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="everything on this machine")
    common(up)
    up.add_argument("--workers", type=int, default=1, help="ComfyUI servers, one Celery worker each")
    up.add_argument("--host", help="the API's address (default 127.0.0.1)")
    up.add_argument("--port", type=int, help="the API's port (default 8000)")
    up.add_argument("--redis-port", type=int, help="port for the Redis it starts (default: a free one)")
    up.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=True, help="ComfyUI on the CPU (--no-cpu: GPU)")
    up.add_argument("--gpu-per-worker", action="store_true", help="ComfyUI i sees only GPU i (CUDA_VISIBLE_DEVICES)")
    up.add_argument("--comfy-threads", type=int, help="CPU threads per ComfyUI (OMP_NUM_THREADS)")
    up.add_argument("--models-dir", type=Path, help="a ComfyUI models folder with the real Z-Image files")
    up.add_argument("--token-ttl", type=float, default=86400.0)
    for name in ("jobs-per-minute", "max-queued", "queue-limit", "cache-ttl"):
        up.add_argument(f"--{name}", type=int)
    up.add_argument("--job-timeout", type=float)
    up.set_defaults(run=cmd_up)
    token = sub.add_parser("token", help="mint a bearer token")
    common(token)
    token.add_argument("--sub", required=True, help="the subject (who the quotas count)")
    token.add_argument("--scope", action="append", choices=("generate", "admin"), help="repeat for both")
    token.add_argument("--ttl", type=float, default=86400.0, help="seconds until it expires")
    token.set_defaults(run=cmd_token)
    worker = sub.add_parser("worker", help="one Celery worker for one ComfyUI")
    common(worker)
    worker.add_argument("--comfy-url", help="its ComfyUI, e.g. http://127.0.0.1:8188")
    worker.add_argument("--name", help="the worker's name (default worker-<pid>)")
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--job-timeout", type=float)
    worker.set_defaults(run=cmd_worker)
    api = sub.add_parser("api", help="the HTTP API")
    common(api)
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    for name in ("jobs-per-minute", "max-queued", "queue-limit", "cache-ttl"):
        api.add_argument(f"--{name}", type=int)
    api.set_defaults(run=cmd_api)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
