"""The REST API with every argument but the prompt optional.

gradio_client (and Gradio's `/call/v2/<name>`, which takes arguments by name) fill left-out
arguments with the form's defaults themselves. The plain `POST /gradio_api/call/<name>` with
`{"data": ["a cat"]}` does not: Gradio refuses a short list. `ApiDefaults` pads the list with the
same defaults (the model preset's size and steps, guidance 0, seed -1, one image) before Gradio
reads it, so the three ways of calling agree.
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # a call's JSON is small; anything larger goes through untouched


def api_defaults(blocks: Any) -> dict[str, list[Any]]:
    """{api_name: the default of each input, in order} for every public endpoint."""
    out: dict[str, list[Any]] = {}
    for fn in blocks.fns.values():
        if not fn.api_name or getattr(fn, "api_visibility", "public") != "public":
            continue
        out[str(fn.api_name)] = [getattr(block, "value", None) for block in fn.inputs]
    return out


class ApiDefaults:
    """ASGI middleware: pads a short `data` list of POST .../call/<name> with the endpoint's defaults."""

    def __init__(self, app: Any, blocks: Any):
        self.app = app
        self.blocks = blocks
        self._defaults: dict[str, list[Any]] | None = None

    def _for(self, path: str) -> list[Any] | None:
        head, sep, name = path.rstrip("/").rpartition("/call/")
        if not sep or "/" in name or head.endswith("/call"):
            return None
        if self._defaults is None:
            self._defaults = api_defaults(self.blocks)
        return self._defaults.get(name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or "/call/" not in scope["path"]:
            await self.app(scope, receive, send)
            return
        defaults = self._for(scope["path"])
        if not defaults:
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if size <= MAX_BODY:
            body = _pad(body, defaults)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        scope = {**scope, "headers": headers}
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _pad(body: bytes, defaults: list[Any]) -> bytes:
    try:
        payload = json.loads(body or b"{}")
    except ValueError:
        return body  # Gradio answers a broken body itself
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list) or len(data) >= len(defaults):
        return body
    payload["data"] = data + defaults[len(data) :]
    return json.dumps(payload).encode()
