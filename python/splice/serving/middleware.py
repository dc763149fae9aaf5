"""ASGI middleware for vLLM's OpenAI server (``--middleware``; ``splice serve`` adds it).

It sees every HTTP request and decides every request's prefix-cache salt (:mod:`.salts`):

* a POST whose JSON body has ``vllm_xargs`` with ``splice_*`` keys must go to one of
  :data:`PATHS`; its steering is checked against the served recipe (HTTP 400 naming the field
  when wrong), then the body is rewritten with the canonical steering (explicit names and scales),
  the steered ``cache_salt`` (derived under the server's secret from the configuration and the
  client's own salt), ``splice_salt`` (that salt) and ``splice_token`` (the mark binding the
  configuration to the salt), which vLLM's request validation (:mod:`.request_rows`) requires, and
  ``splice_whole_prompt`` when a gate is decided at prefill;
* any other POST whose JSON body carries a ``cache_salt`` gets it namespaced (``splice-c-…``), so
  no client can pick a salt that steered requests use;
* ``/splice/v1/interventions`` is the admin endpoint (:mod:`.admin`), answered here;
* everything else passes through untouched.

A steered request holds its configuration's table slot while vLLM handles it (:mod:`.admission`);
when every slot is held by other configurations it waits, then gets HTTP 503 with ``Retry-After``.

A client's ``cache_salt`` is checked as vLLM checks it (a non-empty string of at most 128
characters without ``@``, ``/``, ``\\`` or NUL) before it is namespaced.
"""

from __future__ import annotations

import asyncio
import json

from ..recipe import RecipeError
from . import admin, salts
from .admission import SlotsBusy
from .catalog import Catalog
from .registry import RegistryError
from .request_params import SALT, TOKEN, VECTOR, WHOLE_PROMPT, RequestSteering, SteeringParamError, wants_steering

IMPORT_PATH = "splice.serving.middleware.SteeringMiddleware"
PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
SALT_FIELD = "cache_salt"
_MAX_SALT, _FORBIDDEN_IN_SALT = 128, set("@/\\\0")


class RequestError(ValueError):
    """A request refused with HTTP 400; ``field`` names the offending body field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def vouches(extra_args: dict, steering: RequestSteering) -> bool:
    """Whether ``extra_args`` carries this server's mark for ``steering`` under its ``splice_salt``."""
    return salts.vouches(extra_args.get(TOKEN), steering.key, extra_args.get(SALT))


def _client_salt(data: dict) -> str | None:
    salt = data.get(SALT_FIELD)
    if salt is None:
        return None
    if not isinstance(salt, str) or not salt or len(salt) > _MAX_SALT or _FORBIDDEN_IN_SALT & set(salt):
        raise RequestError(SALT_FIELD, f"{SALT_FIELD} must be a non-empty string of at most {_MAX_SALT} "
                                       "characters without '@', '/', '\\' or NUL")
    return salt


def _payload(message: str, field: str, status: int) -> bytes:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
            409: "ConflictError", 413: "RequestTooLargeError", 503: "ServiceUnavailableError"}.get(status, "Error")
    return json.dumps({"error": {"message": message, "type": kind, "param": field, "code": status}}).encode()


async def _respond(send, status: int, payload: bytes, headers=()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


async def _read_body(receive, limit: int | None) -> bytes | None:
    """The whole request body (None: the client left, or it is over ``limit`` bytes)."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


async def _let_aborts_out() -> None:
    """Let a handler vLLM cancelled on a disconnect send its abort before the slot is released.

    vLLM's ``with_cancellation`` (non-streamed responses) returns once it has called ``cancel()`` on
    the handler task, without awaiting it. The cancelled task, waiting on its output queue's event,
    wakes on the next loop step and in that step, without suspending, hands the abort to the engine's
    socket (``AsyncLLM.generate`` → ``abort`` → ``send_multipart``). The loop runs callbacks first in,
    first out, so after these steps a request admitted on the freed slot reaches the engine after
    the abort. (Streamed responses await their cancelled stream before returning.)"""
    for _ in range(3):
        await asyncio.sleep(0)


class SteeringMiddleware:
    def __init__(self, app):
        self.app = app
        self.catalog: Catalog | None = None

    def _catalog(self, scope) -> Catalog:
        if self.catalog is None:
            self.catalog = Catalog(scope["app"].state.vllm_config)
        return self.catalog

    def _rewrite(self, scope, data: dict) -> RequestSteering | None:
        """Set ``data``'s salt (and steering) in place; the steering (None: unsteered). Raises on bad input."""
        client_salt = _client_salt(data)
        if not wants_steering(data.get("vllm_xargs")):
            if client_salt is not None:
                data[SALT_FIELD] = salts.client_salt(client_salt)
            return None
        if scope["path"] not in PATHS:
            raise SteeringParamError(VECTOR, f"steering is served on {', '.join(PATHS)} only")
        catalog = self._catalog(scope)
        steering = catalog.resolve(data["vllm_xargs"])
        salt = salts.steered_salt(steering.key, client_salt)
        data["vllm_xargs"] = {k: v for k, v in data["vllm_xargs"].items() if k != WHOLE_PROMPT}
        data["vllm_xargs"].update(steering.to_xargs(), **{SALT: salt, TOKEN: salts.mark(steering.key, salt)})
        if catalog.whole_prompt(steering):
            data["vllm_xargs"][WHOLE_PROMPT] = True
        data[SALT_FIELD] = salt
        return steering

    async def _admin(self, scope, receive, send):
        try:
            catalog = self._catalog(scope)
            if catalog.registry is None:
                raise RegistryError("registry", "the admin endpoint is off: start the server with a 'registry' "
                                                "directory (splice serve --registry DIR)", 404)
            refused = admin.authorize(scope, catalog.token)
            if refused is not None:
                raise refused
            limit = catalog.options.max_upload_mb << 20
            body = await _read_body(receive, limit)
            if body is None:
                raise RegistryError("body", f"larger than max_upload_mb ({catalog.options.max_upload_mb} MiB)", 413)
            status, payload = admin.handle(catalog, scope["method"], scope["path"], body)
        except SteeringParamError as exc:  # a vLLM server that loaded no splice recipe
            return await _respond(send, 404, _payload(str(exc), "registry", 404))
        except RegistryError as exc:
            extra = [(b"www-authenticate", b"Bearer")] if exc.status == 401 else []
            return await _respond(send, exc.status, _payload(str(exc), exc.field, exc.status), extra)
        await _respond(send, status, json.dumps(payload).encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and admin.is_admin(scope["path"]):
            return await self._admin(scope, receive, send)
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        body = await _read_body(receive, None)
        if body is None:
            return  # the client left before its request was whole
        try:
            data = json.loads(body)
        except ValueError:
            data = None  # not JSON: vLLM refuses it, or reads it as a form, which has no salt
        steering = None
        if isinstance(data, dict):
            salt = data.get(SALT_FIELD)
            try:
                steering = self._rewrite(scope, data)
            except (RequestError, SteeringParamError, RecipeError) as exc:
                return await _respond(send, 400, _payload(str(exc), getattr(exc, "field", VECTOR), 400))
        if steering is not None or (isinstance(data, dict) and data.get(SALT_FIELD) != salt):
            body = json.dumps(data).encode()
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope = dict(scope, headers=headers + [(b"content-length", str(len(body)).encode())])
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        if steering is None:
            return await self.app(scope, replay, send)
        catalog = self._catalog(scope)
        try:
            async with catalog.admission.hold(steering.key, steering.versions, catalog.collect):
                await self.app(scope, replay, send)
                await _let_aborts_out()
                return
        except SlotsBusy as exc:
            return await _respond(send, 503, _payload(str(exc), VECTOR, 503), [(b"retry-after", b"1")])
