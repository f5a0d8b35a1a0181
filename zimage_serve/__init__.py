"""The generation service: an HTTP API in front of Celery workers, one per headless ComfyUI (docs/serving.md)."""
