"""A client of the admin endpoint (:mod:`.admin`): register, replace, list and delete interventions."""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from .admin import PREFIX


class AdminError(RuntimeError):
    def __init__(self, status: int, body: dict):
        super().__init__(f"HTTP {status}: {body.get('error', {}).get('message', body)}")
        self.status, self.body = status, body


class AdminClient:
    """``AdminClient("http://host:8000", token)``; every call returns the server's JSON answer."""

    def __init__(self, base_url: str, token: str, timeout: float = 60):
        self.base_url, self.token, self.timeout = base_url.rstrip("/"), token, timeout

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method,
                                         headers={"Authorization": f"Bearer {self.token}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise AdminError(exc.code, json.loads(exc.read() or b"{}")) from None

    def register(self, name: str, entry: dict, files: dict[str, str | os.PathLike]) -> dict:
        """Register or replace ``name``: ``entry`` is a recipe entry naming ``files``' keys, whose
        values are local paths uploaded as they are."""
        encoded = {key: base64.b64encode(Path(path).read_bytes()).decode() for key, path in files.items()}
        return self._call("PUT", f"{PREFIX}/{name}", {"entry": entry, "files": encoded})

    def register_vectors(self, name: str, path: str | os.PathLike, **entry) -> dict:
        """Register the vector file at ``path`` (safetensors or GGUF) as ``name`` with entry settings
        ``entry`` (``scale``, ``op``, ``site``, ``layers``, ``positions``, ...)."""
        key = "vectors" + Path(path).suffix
        return self.register(name, {"file": key, **entry}, {key: path})

    def delete(self, name: str) -> dict:
        return self._call("DELETE", f"{PREFIX}/{name}")

    def list(self) -> dict:
        return self._call("GET", PREFIX)
