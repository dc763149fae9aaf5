"""Prefix-cache salts and the middleware's mark, all keyed by the server's secret.

vLLM's prefix cache shares KV blocks between requests whose ``cache_salt`` and prompt prefix are
equal. The middleware gives every request a salt in one of three disjoint spaces:

* unsteered, no client salt: no salt (vLLM's default space, which steered requests never use);
* unsteered, client salt ``S``: ``splice-c-`` HMAC(secret, ["client", S]);
* steered by configuration ``K`` (client salt ``S`` or none): ``splice-s-`` HMAC(secret, ["steer", K, S]).

A client's own salt never reaches vLLM unchanged, and without the secret nobody can name a salt of
the steered space, so no request can plant blocks that another configuration will read. The mark
(``splice_token``) is HMAC(secret, ["mark", K, salt]): it vouches for one steering configuration
under one salt, which :mod:`.request_rows` checks against the salt the request carries.

The secret is ``SPLICE_SERVE_SECRET`` (hex, at least 32 bytes) when set, so every process of one
server (several API servers) derives the same salts; :func:`splice.serving.launch.start` sets a
fresh one per server. Otherwise each process draws its own.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets

ENV = "SPLICE_SERVE_SECRET"
MIN_SECRET_BYTES = 32


def _load_secret() -> bytes:
    text = os.environ.get(ENV)
    if not text:
        return secrets.token_bytes(MIN_SECRET_BYTES)
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise RuntimeError(f"{ENV} must be hex digits") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise RuntimeError(f"{ENV} must hold at least {MIN_SECRET_BYTES} bytes ({2 * MIN_SECRET_BYTES} hex digits)")
    return secret


_SECRET = _load_secret()


def new_secret() -> str:
    """A fresh value for :data:`ENV`."""
    return secrets.token_hex(MIN_SECRET_BYTES)


def _mac(*parts) -> str:
    return hmac.new(_SECRET, json.dumps(parts).encode(), hashlib.sha256).hexdigest()


def client_salt(salt: str) -> str:
    """The salt an unsteered request with the client's own ``salt`` gets."""
    return "splice-c-" + _mac("client", salt)[:48]


def steered_salt(key: str, salt: str | None) -> str:
    """The salt of a request steered by configuration ``key`` (client salt ``salt`` or None)."""
    return "splice-s-" + _mac("steer", key, salt)[:48]


def mark(key: str, salt: str) -> str:
    """The middleware's mark on a request steered by ``key`` under cache salt ``salt``."""
    return _mac("mark", key, salt)[:32]


def vouches(token, key: str, salt) -> bool:
    """Whether ``token`` is this server's mark for configuration ``key`` under ``salt``."""
    return isinstance(token, str) and isinstance(salt, str) and hmac.compare_digest(token, mark(key, salt))
