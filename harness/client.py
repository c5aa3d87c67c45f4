"""A small client for ComfyUI's HTTP API (the parts both the snapshot and current ComfyUI share)."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field


class PromptRejected(RuntimeError):
    """POST /prompt refused the graph (validation error); `.body` holds the server's answer."""

    def __init__(self, status: int, body):
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.body = status, body


@dataclass
class Run:
    prompt_id: str
    status: str  # "success" or "error"
    outputs: dict
    messages: list
    events: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def error(self) -> dict | None:
        for kind, data in self.messages:
            if kind == "execution_error":
                return data
        return None

    @property
    def error_text(self) -> str:
        e = self.error
        return "" if e is None else f"{e.get('exception_type', '')}: {e.get('exception_message', '')}"

    def images(self, node_id: str) -> list[dict]:
        return self.outputs.get(str(node_id), {}).get("images", [])


class ComfyClient:
    def __init__(self, base_url: str):
        self.base = base_url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self._events: list = []
        self._ws_thread = None
        self._ws = None

    # --- plain HTTP ---------------------------------------------------------------------------
    def _request(self, path: str, data=None, timeout: float = 30.0):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.base + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw and raw[:1] in (b"{", b"[") else raw

    def object_info(self, node: str | None = None) -> dict:
        return self._request("/object_info" + (f"/{node}" if node else ""))

    def alive(self) -> bool:
        try:
            self._request("/queue", timeout=5)
            return True
        except Exception:
            return False

    def queue(self, prompt: dict) -> str:
        try:
            answer = self._request("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
            raise PromptRejected(e.code, body) from None
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self._request(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 600.0) -> Run:
        t0 = time.monotonic()
        while True:
            h = self.history(prompt_id)
            if h is not None and h.get("status", {}).get("completed") is not None:
                st = h["status"]
                done = st.get("status_str") == "success" and st.get("completed")
                # the snapshot marks an error with completed False; both list the messages
                if st.get("status_str") in ("success", "error") or st.get("completed"):
                    return Run(prompt_id, "success" if done else "error", h.get("outputs", {}),
                               [tuple(m) for m in st.get("messages", [])],
                               [e for e in self._events if e.get("data", {}).get("prompt_id") in (prompt_id, None)],
                               time.monotonic() - t0)
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s")
            time.sleep(0.1)

    def run(self, prompt: dict, timeout: float = 600.0) -> Run:
        return self.wait(self.queue(prompt), timeout)

    def free(self) -> None:
        """Unload models and drop ComfyUI's cached outputs, and return only once that happened.
        The server applies /free after the prompt it runs next (or at once when idle, racing
        with the next queued prompt), so a prompt queued right after /free could have its cached
        outputs wiped before the prompt after it: loaders then run again and give new objects.
        A no-op prompt run here takes that turn."""
        self._request("/free", {"unload_models": True, "free_memory": True})
        run = self.run({"1": {"class_type": "BarycenterTestNoop", "inputs": {}}}, timeout=120)
        if run.status != "success":
            raise RuntimeError(f"no-op prompt after /free failed: {run.error_text}")

    def interrupt(self) -> None:
        self._request("/interrupt", {})

    def view(self, image: dict) -> bytes:
        q = "&".join(f"{k}={urllib.request.quote(str(image.get(k, '')))}" for k in ("filename", "subfolder", "type"))
        return self._request(f"/view?{q}")

    # --- websocket events (progress, executing, executed, execution_error) -------------------
    def listen(self) -> None:
        """Start collecting websocket events for this client id in a background thread."""
        if self._ws_thread is not None:
            return
        import websocket  # websocket-client, a dev dependency

        url = self.base.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        self._ws = websocket.create_connection(url, timeout=10)
        self._ws.settimeout(None)  # quiet stretches (a checkpoint being generated) must not end it

        def pump():
            while True:
                try:
                    msg = self._ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                except Exception:
                    return
                if isinstance(msg, str):
                    try:
                        self._events.append(json.loads(msg))
                    except ValueError:
                        pass

        self._ws_thread = threading.Thread(target=pump, daemon=True)
        self._ws_thread.start()

    def events(self, kind: str | None = None) -> list:
        return [e for e in list(self._events) if kind is None or e.get("type") == kind]

    def close(self) -> None:
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:
                pass
