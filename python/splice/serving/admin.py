"""The admin endpoint (opt-in: the ``registry`` option), served by the middleware:

* ``GET /splice/v1/interventions``: the recipe's names, registered names with their versions, and
  the steering slots in use;
* ``PUT /splice/v1/interventions/{name}``: register or replace ``name``; the JSON body is
  ``{"entry": E, "files": {key: base64}}``, ``E`` a recipe entry whose ``file`` / ``map`` /
  ``gate.direction`` name the uploaded files by key (``v.safetensors``, ``v.gguf``): 201 (new) or 200
  (replaced) with ``{"name", "version"}``;
* ``DELETE /splice/v1/interventions/{name}``: 200 with the deleted version.

Every call needs ``Authorization: Bearer <SPLICE_ADMIN_TOKEN>`` (401 without, 403 when wrong). A
refused call (400, 404, 409, 413 naming the field) changes nothing: requests keep the versions
they were admitted with, and a replaced version's files stay until no request in flight names it.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json

from .catalog import Catalog
from .registry import RegistryError

PREFIX = "/splice/v1/interventions"


def is_admin(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def _bearer(scope) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def authorize(scope, token: str) -> RegistryError | None:
    """None when the request carries the admin token; else the 401 or 403 to answer."""
    given = _bearer(scope)
    if given is None:
        return RegistryError("authorization", "the admin endpoint needs 'Authorization: Bearer <token>'", 401)
    if not hmac.compare_digest(given.encode(), token.encode()):
        return RegistryError("authorization", "wrong admin token", 403)
    return None


def _upload(body: bytes) -> tuple[object, dict[str, bytes]]:
    try:
        data = json.loads(body)
    except ValueError:
        raise RegistryError("body", 'must be JSON: {"entry": {...}, "files": {"v.safetensors": "<base64>"}}') from None
    if not isinstance(data, dict) or set(data) - {"entry", "files"} or "entry" not in data:
        raise RegistryError("body", 'must be {"entry": {...}, "files": {...}} and nothing else')
    files = data.get("files", {})
    if not isinstance(files, dict):
        raise RegistryError("files", "must map file keys to base64 contents")
    decoded = {}
    for key, text in files.items():
        try:
            decoded[key] = base64.b64decode(text, validate=True) if isinstance(text, str) else None
        except (binascii.Error, ValueError):
            decoded[key] = None
        if decoded[key] is None:
            raise RegistryError(f"files.{key}", "must be a base64 string")
    return data["entry"], decoded


def handle(catalog: Catalog, method: str, path: str, body: bytes) -> tuple[int, dict]:
    """(status, JSON payload) of one authorized admin call; RegistryError when refused."""
    name = path[len(PREFIX) + 1:] if path != PREFIX else None
    if name is None:
        if method != "GET":
            raise RegistryError("method", f"{method} {PREFIX}: use GET (or PUT/DELETE {PREFIX}/NAME)", 405)
        return 200, catalog.describe()
    if method == "PUT":
        entry, files = _upload(body)
        version, created = catalog.register(name, entry, files)
        return (201 if created else 200), {"name": name, "version": version}
    if method == "DELETE":
        return 200, {"name": name, "version": catalog.delete(name)}
    raise RegistryError("method", f"{method} {PREFIX}/NAME: use PUT or DELETE", 405)
