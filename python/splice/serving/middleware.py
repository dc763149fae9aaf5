"""ASGI middleware for vLLM's OpenAI server (``--middleware``; ``splice serve`` adds it).

For a completion, chat completion or responses request whose ``vllm_xargs`` has ``splice_*`` keys
it checks the steering against the served recipe and answers HTTP 400 naming the field when it is
wrong; otherwise it rewrites the request with the canonical steering (explicit names and scales)
and a ``cache_salt`` derived from that steering and the client's own salt. vLLM's prefix cache
keys blocks by that salt, so differently steered prompts never share blocks. It also adds
``splice_token``, an HMAC of the steering under a secret of this process, which vLLM's request
validation (:mod:`.request_rows`) requires: a steered request that reached vLLM any other way (an
endpoint without ``cache_salt``, a server without the middleware) is refused. Other requests pass
through untouched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets

from ..recipe import RecipeError
from .options import ServeOptions, load_serving_recipe
from .request_params import TOKEN, VECTOR, RequestSteering, SteeringParamError, parse, wants_steering

IMPORT_PATH = "splice.serving.middleware.SteeringMiddleware"
PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
_SECRET = secrets.token_bytes(32)


def token(steering: RequestSteering) -> str:
    """The middleware's mark on a request it salted (valid in this process only)."""
    return hmac.new(_SECRET, steering.key.encode(), hashlib.sha256).hexdigest()[:32]


def vouches(extra_args: dict, steering: RequestSteering) -> bool:
    """Whether ``extra_args`` carries this process's middleware mark for ``steering``."""
    return hmac.compare_digest(str(extra_args.get(TOKEN, "")), token(steering))


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

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in PATHS:
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
            data = None  # vLLM answers malformed JSON itself
        if isinstance(data, dict) and wants_steering(data.get("vllm_xargs")):
            try:
                steering = self._steering(scope, data)
            except (SteeringParamError, RecipeError) as exc:
                field = getattr(exc, "field", VECTOR)
                payload = _error(str(exc), field)
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(payload)).encode())]})
                return await send({"type": "http.response.body", "body": payload})
            data["vllm_xargs"].update(steering.to_xargs(), **{TOKEN: token(steering)})
            client_salt = data.get("cache_salt")
            data["cache_salt"] = steering.cache_salt(client_salt if isinstance(client_salt, str) else None)
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
