"""Talk to a ComfyUI server as any client program does: /prompt, /ws, /history, /view."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field

import websocket


class ComfyError(RuntimeError):
    """Base of the client's errors."""


class PromptRejected(ComfyError):
    """The server refused the prompt at validation (HTTP 400); `node_errors` says which node and input."""

    def __init__(self, payload: dict):
        self.payload = payload
        self.error = payload.get("error", {})
        self.node_errors = payload.get("node_errors", {})
        super().__init__(format_rejection(payload))


class ServerUnreachable(ComfyError):
    pass


class RunTimeout(ComfyError):
    def __init__(self, message: str, prompt_id: str = ""):
        self.prompt_id = prompt_id  # still queued or running on the server: the caller may take it back
        super().__init__(message)


def format_rejection(payload: dict) -> str:
    error = payload.get("error", {})
    lines = [f"prompt rejected: {error.get('message', '')} {error.get('details', '')}".strip()]
    for node_id, info in payload.get("node_errors", {}).items():
        for e in info.get("errors", []):
            name = e.get("extra_info", {}).get("input_name", "")
            lines.append(f"  node {node_id} ({info.get('class_type', '?')}) {name}: {e.get('message', '')} "
                         f"{e.get('details', '')}".rstrip())
    return "\n".join(lines)


@dataclass
class RunResult:
    prompt_id: str
    status: str  # "success", "error", "interrupted", or "cancelled" (taken back before it started, or never queued)
    history: dict
    error: dict | None = None  # the execution_error message (node_id, node_type, exception_message, ...)
    progress: list = field(default_factory=list)  # (node, value, max) from /ws progress messages
    queued_at: float | None = None  # time.monotonic() when /prompt accepted it
    started_at: float | None = None  # when execution_start arrived
    ended_at: float | None = None  # when the run finished, failed or was interrupted

    @property
    def outputs(self) -> dict:
        return self.history.get("outputs", {})

    @property
    def queue_seconds(self) -> float | None:
        """Time spent waiting in the server's queue (behind other prompts)."""
        end = self.started_at if self.started_at is not None else self.ended_at
        return None if self.queued_at is None or end is None else end - self.queued_at

    @property
    def run_seconds(self) -> float | None:
        """Time the server spent executing it."""
        return None if self.started_at is None or self.ended_at is None else self.ended_at - self.started_at

    def images(self, types=("output",)) -> list[dict]:
        """Images the run saved (type "output"); add "temp" for previews (PreviewImage)."""
        return [img for out in self.outputs.values() for img in out.get("images", []) if img.get("type", "output") in types]


class ComfyClient:
    def __init__(self, base_url: str, client_id: str | None = None, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.timeout = timeout

    # -- HTTP -------------------------------------------------------------------------------------
    def _request(self, path: str, data: bytes | None = None, method: str | None = None, content_type: str | None = None):
        headers = {"Content-Type": content_type or "application/json"} if data else {}
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            raise ServerUnreachable(f"cannot reach ComfyUI at {self.base_url}: {e}") from None

    def get_json(self, path: str):
        with self._request(path) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> bytes:
        with self._request(path) as r:
            return r.read()

    def post_json(self, path: str, payload) -> tuple[int, dict]:
        """(HTTP status, JSON answer): error answers are returned, not raised, so callers can read them."""
        try:
            with self._request(path, data=json.dumps(payload).encode()) as r:
                body = r.read()
                return r.status, json.loads(body) if body.strip() else {}  # POST /queue answers with no body
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body or b"{}")
            except ValueError:  # a plain-text error page
                return e.code, {"error": body.decode("utf-8", "replace")}

    def system_stats(self) -> dict:
        return self.get_json("/system_stats")

    def object_info(self, node_type: str | None = None) -> dict:
        return self.get_json("/object_info" + (f"/{urllib.parse.quote(node_type)}" if node_type else ""))

    def queue_prompt(self, prompt: dict) -> str:
        body = json.dumps({"prompt": prompt, "client_id": self.client_id}).encode()
        try:
            with self._request("/prompt", data=body) as r:
                return json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as e:
            payload = json.loads(e.read() or b"{}")
            raise PromptRejected(payload) from None

    def history(self, prompt_id: str) -> dict:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id, {})

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                        "type": image.get("type", "output")})
        return self.get_bytes(f"/view?{query}")

    def upload_image(self, name: str, data: bytes, overwrite: bool = True) -> dict:
        """POST /upload/image (multipart, as the browser sends it); returns {"name", "subfolder", "type"}."""
        boundary = uuid.uuid4().hex
        fields = [(b'name="overwrite"', b"true" if overwrite else b"false"),
                  (f'name="image"; filename="{name}"'.encode() + b"\r\nContent-Type: image/png", data)]
        body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Disposition: form-data; " + head + b"\r\n\r\n" + value + b"\r\n"
                        for head, value in fields) + b"--" + boundary.encode() + b"--\r\n"
        with self._request("/upload/image", data=body, content_type=f"multipart/form-data; boundary={boundary}") as r:
            return json.loads(r.read())

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Interrupt the running prompt; with a prompt id, servers that know the field interrupt only that prompt."""
        self._request("/interrupt", data=json.dumps({"prompt_id": prompt_id} if prompt_id else {}).encode()).close()

    def queue(self) -> dict:
        """GET /queue: {"queue_running": [...], "queue_pending": [...]}, entries [number, prompt_id, prompt, ...]."""
        return self.get_json("/queue")

    def cancel(self, prompt_ids) -> tuple[list[str], list[str]]:
        """Take prompts back: delete those still pending, interrupt the running one only if it is among them.

        Returns (deleted, interrupted). Another client's prompt is never touched: the running entry is checked
        first, because servers older than the /interrupt prompt_id field interrupt whatever runs."""
        ids = set(prompt_ids)
        if not ids:
            return [], []
        queue = self.queue()
        pending = [entry[1] for entry in queue.get("queue_pending", []) if entry[1] in ids]
        if pending:
            self.post_json("/queue", {"delete": pending})
        running = [entry[1] for entry in queue.get("queue_running", []) if entry[1] in ids]
        for prompt_id in running:
            self.interrupt(prompt_id)
        return pending, running

    # -- websocket --------------------------------------------------------------------------------
    def connect(self) -> websocket.WebSocket:
        url = self.base_url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        try:
            return websocket.create_connection(url, timeout=5)
        except (OSError, websocket.WebSocketException) as e:
            raise ServerUnreachable(f"cannot open the websocket at {url}: {e}") from None

    def run(self, prompt: dict, timeout: float = 600.0, on_message=None, *, queue=None, stopped=None) -> RunResult:
        """Queue a prompt and follow /ws until it finishes, fails or is interrupted; then read /history.

        `queue(prompt)` replaces queue_prompt (a batch registers each prompt id, or returns None once it is
        stopping: the result is then "cancelled"). `stopped()` turns true once the caller has taken its prompts
        back from the server: a prompt deleted from the queue sends no message, so following ends there."""
        ws = self.connect()  # before queueing, so no message is missed
        try:
            prompt_id = (queue or self.queue_prompt)(prompt)
            if prompt_id is None:
                return RunResult("", "cancelled", {})
            result = self._follow(ws, prompt_id, timeout, on_message, stopped)
        finally:
            ws.close()
        if result.status != "cancelled":
            result.history = self._wait_history(prompt_id, wait=2.0 if stopped is not None and stopped() else 10.0)
        return result

    def _follow(self, ws, prompt_id: str, timeout: float, on_message, stopped=None) -> RunResult:
        result = RunResult(prompt_id, "", {}, queued_at=time.monotonic())
        deadline = result.queued_at + timeout
        drain_until = None  # after stopped(): a short wait for messages already on their way
        ws.settimeout(0.5)  # wake up often enough to notice stopped()
        while True:
            now = time.monotonic()
            if now > deadline:
                raise RunTimeout(f"prompt {prompt_id} did not finish within {timeout:.0f} s", prompt_id)
            if drain_until is None and stopped is not None and stopped():
                drain_until = now + 1.5
            if drain_until is not None and now > drain_until:
                result.status = "interrupted" if result.started_at is not None else "cancelled"
                result.ended_at = now
                return result
            try:
                raw = ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except (OSError, websocket.WebSocketException) as e:
                raise ServerUnreachable(f"the websocket closed while prompt {prompt_id} ran: {e}") from None
            if not isinstance(raw, str):
                continue  # binary preview frames
            msg = json.loads(raw)
            kind, data = msg.get("type"), msg.get("data", {})
            if on_message is not None:
                on_message(msg)
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "execution_start" and data.get("prompt_id") == prompt_id:
                result.started_at = time.monotonic()
            elif kind == "progress":
                result.progress.append((data.get("node"), data.get("value"), data.get("max")))
            elif kind == "execution_error":
                result.status, result.error = "error", data
            elif kind == "execution_interrupted":
                result.status, result.error = "interrupted", data
            elif kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                result.status = "success"
            if result.status:
                result.ended_at = time.monotonic()
                return result

    def _wait_history(self, prompt_id: str, wait: float = 10.0) -> dict:
        deadline = time.monotonic() + wait
        while True:
            entry = self.history(prompt_id)
            if entry or time.monotonic() > deadline:
                return entry
            time.sleep(0.1)
