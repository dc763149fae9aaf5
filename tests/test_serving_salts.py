"""Prefix-cache isolation at the HTTP edge (no vLLM server): the salts every request leaves the
middleware with, and the refusals of salts and steering that could cross tenants."""

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from splice.bench.serve_recipe import write_recipe
from splice.serving import salts
from splice.serving.middleware import SteeringMiddleware, vouches
from splice.serving.request_params import parse

STEER = {"splice_vector": "v0", "splice_scale": 4.0}


@pytest.fixture(scope="module")
def app_state(tmp_path_factory):
    recipe = write_recipe(tmp_path_factory.mktemp("salts"), 8, 2, 2)
    load = SimpleNamespace(load_format="splice", model_loader_extra_config={"recipe": str(recipe)})
    model = SimpleNamespace(hf_config=SimpleNamespace(num_hidden_layers=2, hidden_size=8, num_attention_heads=2))
    config = SimpleNamespace(load_config=load, model_config=model, scheduler_config=SimpleNamespace(max_num_seqs=4))
    return SimpleNamespace(state=SimpleNamespace(vllm_config=config))


def _send(app_state, body: dict | bytes, path="/v1/chat/completions"):
    """(status, the JSON body vLLM would receive or the error body) of one POST through the middleware."""
    seen, sent = {}, []
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def vllm(scope, receive, send):
        message = await receive()
        seen["body"] = message["body"]
        seen["length"] = dict(scope["headers"]).get(b"content-length")

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "app": app_state,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]}
    asyncio.run(SteeringMiddleware(vllm)(scope, receive, send))
    if sent:
        return sent[0]["status"], json.loads(sent[1]["body"])
    assert int(seen["length"]) == len(seen["body"])
    return 200, (seen["body"] if isinstance(body, bytes) else json.loads(seen["body"]))


def test_unsteered_client_salts_are_namespaced_on_every_path(app_state):
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/inference/v1/generate"):
        status, got = _send(app_state, {"prompt": "hi", "cache_salt": "tenant-1"}, path)
        assert status == 200 and got["cache_salt"] == salts.client_salt("tenant-1") != "tenant-1"


def test_a_planted_steered_salt_lands_outside_the_steered_space(app_state):
    key = parse(STEER).key
    steered = salts.steered_salt(key, None)
    public = "splice-" + hashlib.sha256(json.dumps([key, None]).encode()).hexdigest()[:48]  # before the fix
    for planted in (steered, public):
        _, got = _send(app_state, {"prompt": "hi", "cache_salt": planted})
        assert got["cache_salt"] not in (steered, public)
    _, victim = _send(app_state, {"prompt": "hi", "vllm_xargs": dict(STEER)})
    assert victim["cache_salt"] == steered


def test_a_request_without_salt_or_steering_passes_untouched(app_state):
    raw = b'{"prompt": "hi",   "max_tokens": 3}'
    assert _send(app_state, raw) == (200, raw)


def test_steered_salts_depend_on_configuration_and_client_salt_and_carry_a_bound_mark(app_state):
    _, a = _send(app_state, {"prompt": "hi", "vllm_xargs": {"splice_vector": "v0"}})
    _, a2 = _send(app_state, {"prompt": "hi", "vllm_xargs": dict(STEER)})  # v0's recipe scale is 4.0
    _, b = _send(app_state, {"prompt": "hi", "vllm_xargs": {"splice_vector": "v0", "splice_scale": 3.0}})
    _, t = _send(app_state, {"prompt": "hi", "vllm_xargs": dict(STEER), "cache_salt": "tenant-1"})
    assert a["cache_salt"] == a2["cache_salt"] != b["cache_salt"]
    assert len({a["cache_salt"], b["cache_salt"], t["cache_salt"], salts.client_salt("tenant-1")}) == 4
    for body in (a, b, t):
        xargs = body["vllm_xargs"]
        assert xargs["splice_salt"] == body["cache_salt"] and len(body["cache_salt"]) <= 128
        assert vouches(xargs, parse(xargs))


def test_client_written_marks_are_replaced(app_state):
    forged = {**STEER, "splice_salt": "mine", "splice_token": salts.mark(parse(STEER).key, "mine")}
    _, got = _send(app_state, {"prompt": "hi", "vllm_xargs": forged})
    assert got["vllm_xargs"]["splice_salt"] == got["cache_salt"] == salts.steered_salt(parse(STEER).key, None)


@pytest.mark.parametrize("salt", ["", "a/b", "a@b", "a\\b", "a\0b", "x" * 129, 7, ["x"]])
def test_bad_client_salts_are_http_400(app_state, salt):
    for body in ({"prompt": "hi", "cache_salt": salt}, {"prompt": "hi", "cache_salt": salt, "vllm_xargs": STEER}):
        status, got = _send(app_state, body)
        assert status == 400 and got["error"]["param"] == "cache_salt"


def test_steering_on_another_path_is_http_400(app_state):
    status, got = _send(app_state, {"prompt": "hi", "vllm_xargs": dict(STEER)}, "/inference/v1/generate")
    assert status == 400 and "vllm_xargs.splice_vector" in got["error"]["message"]


def test_salts_come_from_the_configured_secret():
    code = ("from splice.serving import salts; "
            "print(salts.steered_salt('k', None), salts.client_salt('s'), salts.mark('k', 'x'))")

    def run(secret):
        env = {**os.environ, salts.ENV: secret}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    one, two = salts.new_secret(), salts.new_secret()
    assert run(one) == run(one) != run(two)
    env = {**os.environ, salts.ENV: "ab" * 8}  # 8 bytes: too short to be a secret
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "at least 32 bytes" in done.stderr
