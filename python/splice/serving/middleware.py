"""ASGI middleware for vLLM's OpenAI server (``--middleware``; ``splice serve`` adds it).

It sees every HTTP request and decides every request's prefix-cache salt (:mod:`.salts`):

* a POST whose JSON body has ``vllm_xargs`` with ``splice_*`` keys must go to one of
  :data:`PATHS`; its steering is checked against the served recipe (HTTP 400 naming the field
  when wrong), then the body is rewritten with the canonical steering (explicit names and scales),
  the steered ``cache_salt`` (derived under the server's secret from the configuration and the
  client's own salt), ``splice_salt`` (that salt) and ``splice_token`` (the mark binding the
  configuration to the salt), which vLLM's request validation (:mod:`.request_rows`) requires;
* any other POST whose JSON body carries a ``cache_salt`` gets it namespaced (``splice-c-…``), so
  no client can pick a salt that steered requests use;
* everything else passes through untouched.

A client's ``cache_salt`` is checked as vLLM checks it (a non-empty string of at most 128
characters without ``@``, ``/``, ``\\`` or NUL) before it is namespaced.
"""

from __future__ import annotations

import json

from ..recipe import RecipeError
from . import salts
from .options import ServeOptions, load_serving_recipe
from .request_params import SALT, TOKEN, VECTOR, RequestSteering, SteeringParamError, parse, wants_steering

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


def _error(message: str, field: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "BadRequestError", "param": field,
                                 "code": 400}}).encode()


class SteeringMiddleware:
    def __init__(self, app):
        self.app = app
        self.catalog: tuple[dict[str, float], int] | None = None

    def _catalog(self, asgi_app) -> tuple[dict[str, float], int]:
        """(default scale of every registered vector, max vectors per request) of the served recipe."""
        if self.catalog is None:
            load = asgi_app.state.vllm_config.load_config
            if load.load_format != "splice":
                raise SteeringParamError(VECTOR, "this server applies no splice recipe (start it with --load-format splice)")
            options, _ = ServeOptions.split(load.model_loader_extra_config)
            recipe = load_serving_recipe(options.recipe)
            self.catalog = ({n: s.scale for n, s in recipe.steers.items()}, options.max_vectors_per_request)
        return self.catalog

    def _steering(self, scope, data) -> RequestSteering:
        scales, per_request = self._catalog(scope["app"])
        steering = parse(data["vllm_xargs"], scales)
        if len(steering.items) > per_request:
            raise SteeringParamError(VECTOR, f"{len(steering.items)} vectors; this server allows "
                                             f"{per_request} per request (max_vectors_per_request)")
        return steering

    def _rewrite(self, scope, data: dict) -> bool:
        """Set ``data``'s salt (and steering) in place; whether anything changed. Raises on bad input."""
        client_salt = _client_salt(data)
        if not wants_steering(data.get("vllm_xargs")):
            if client_salt is None:
                return False
            data[SALT_FIELD] = salts.client_salt(client_salt)
            return True
        if scope["path"] not in PATHS:
            raise SteeringParamError(VECTOR, f"steering is served on {', '.join(PATHS)} only")
        steering = self._steering(scope, data)
        salt = salts.steered_salt(steering.key, client_salt)
        data["vllm_xargs"].update(steering.to_xargs(), **{SALT: salt, TOKEN: salts.mark(steering.key, salt)})
        data[SALT_FIELD] = salt
        return True

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            data = json.loads(body)
        except ValueError:
            data = None  # not JSON: vLLM refuses it, or reads it as a form, which has no salt
        if isinstance(data, dict):
            try:
                changed = self._rewrite(scope, data)
            except (RequestError, SteeringParamError, RecipeError) as exc:
                payload = _error(str(exc), getattr(exc, "field", VECTOR))
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(payload)).encode())]})
                return await send({"type": "http.response.body", "body": payload})
            if changed:
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

        return await self.app(scope, replay, send)
