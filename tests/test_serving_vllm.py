"""End to end behind a real vLLM server (the default model): steering per request, isolation between
requests, prefix-cache separation, HTTP 400s and refusals. One patched server serves the session.

Servers run in float32: in bfloat16 vLLM's own greedy output already depends on what else is in the
batch and on prefix-cache hits (different matmul shapes round differently), which would hide
whether one request's steering leaks into another."""

import importlib.util
import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from vllm_probe import WNA16_MISSING, has_wna16_kernel

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed (pip install '.[vllm]'; make test installs it)"),
]

PROMPT = "Tell me about your weekend."
SECRET = "5a" * 32  # the servers' salt secret (SPLICE_SERVE_SECRET), known here to play the strongest attacker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it for kernels
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["SPLICE_SERVE_SECRET"] = SECRET
    return env


def _serve(cmd, log, port):
    from splice.serving import launch

    return launch.start_ready(cmd, port, log, _env())


class Server:
    def __init__(self, port, model):
        import openai

        self.port, self.model = port, model
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=300)

    def chat(self, xargs=None, prompt=PROMPT, max_tokens=24, salt=None, **kw):
        extra = {"vllm_xargs": xargs} if xargs is not None else {}
        if salt is not None:
            extra["cache_salt"] = salt
        r = self.client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, temperature=0, extra_body=extra, **kw)
        return r

    def text(self, xargs=None, **kw):
        return self.chat(xargs, **kw).choices[0].message.content

    def completion(self, prompt, xargs=None):
        extra = {"vllm_xargs": xargs} if xargs is not None else {}
        r = self.client.completions.create(model=self.model, prompt=prompt, max_tokens=16, temperature=0,
                                           logprobs=1, extra_body=extra)
        return r.choices[0].text, r.choices[0].logprobs.token_logprobs


@pytest.fixture(scope="session")
def recipe(tmp_path_factory):
    from splice.bench.serve_recipe import write_recipe

    return write_recipe(tmp_path_factory.mktemp("serve"), 576, 30, 4, scale=8.0, ablate=True)


@pytest.fixture(scope="session")
def server(recipe, tmp_path_factory):
    from splice.models.loader import default_model_dir
    from splice.serving import launch

    port, model = _free_port(), str(default_model_dir())
    log = tmp_path_factory.mktemp("logs") / "splice-server.log"
    cmd = launch.command(recipe, ["--model", model, "--port", str(port), "--max-model-len", "2048",
                                  "--dtype", "float32", "--enable-prompt-tokens-details"])
    proc = _serve(cmd, log, port)
    yield Server(port, model)
    launch.stop(proc)


def test_steered_and_unsteered_chat_and_streaming(server):
    plain = server.text()
    steered = server.text({"splice_vector": "v0", "splice_scale": 8.0})
    assert steered != plain
    assert server.text({"splice_vector": ["v0", "flat"]}) not in (plain, steered)
    assert server.text() == plain  # steering left nothing behind
    stream = server.chat({"splice_vector": "v0", "splice_scale": 8.0}, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == steered


def test_concurrent_mix_equals_each_request_alone(server):
    configs = [None, {"splice_vector": "v0"}, {"splice_vector": "v1", "splice_scale": -6.0},
               {"splice_vector": ["v2", "v3"], "splice_scale": [3.0, 5.0]}, {"splice_vector": "v3"},
               {"splice_vector": "v0", "splice_scale": 2.5}, {"splice_vector": ["v1", "flat"]}, None]
    prompts = ["Tell me about your weekend.", "What is the capital of France?", "Write a haiku about rain.",
               "Give me three tips for sleeping well."]
    jobs = [(configs[i % len(configs)], prompts[i % len(prompts)]) for i in range(32)]
    alone = [server.text(x, prompt=p) for x, p in jobs]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda job: server.text(job[0], prompt=job[1]), jobs))
    assert together == alone
    assert len({a for (x, p), a in zip(jobs, alone) if p == prompts[0]}) > 1  # the mix really steers


def test_prefix_cache_is_never_shared_across_steering(server):
    prompt = "Here is a long shared preamble that many requests start with. " * 20 + "Now answer: what is 2+2?"

    def cached(xargs):
        usage = server.chat(xargs, prompt=prompt, max_tokens=2).usage
        return usage.prompt_tokens_details.cached_tokens or 0

    cached(None)
    assert cached(None) > 0  # prefix caching is on
    assert cached({"splice_vector": "v0"}) == 0
    assert cached({"splice_vector": "v0"}) > 0  # same steering shares its own blocks
    assert cached({"splice_vector": "v0", "splice_scale": 2.0}) == 0
    assert cached({"splice_vector": "v1"}) == 0


def test_an_unsteered_request_cannot_plant_blocks_for_a_steered_one(server, monkeypatch):
    """Issue 13's attack: an unsteered request carrying the salt a steered configuration gets (as the
    old public formula computed it, and as this server derives it, which an attacker knowing the
    secret could compute) fills the prefix cache over a popular prompt. The steered request that
    follows must find no cached block and give the text it gives under a fresh salt of its own."""
    import hashlib
    import uuid

    from splice.serving import salts
    from splice.serving.request_params import parse

    prompt = "Every tenant of this server starts with the same long instructions. " * 24 + "Now say hello."
    steer = {"splice_vector": "v0", "splice_scale": 8.0}
    key = parse(steer).key
    monkeypatch.setattr(salts, "_SECRET", bytes.fromhex(SECRET))
    public = "splice-" + hashlib.sha256(json.dumps([key, None]).encode()).hexdigest()[:48]
    for planted in (public, salts.steered_salt(key, None)):
        server.chat(None, prompt=prompt, max_tokens=2, salt=planted)
        assert server.chat(None, prompt=prompt, max_tokens=2, salt=planted).usage.prompt_tokens_details.cached_tokens

    victim = server.chat(steer, prompt=prompt)
    assert (victim.usage.prompt_tokens_details.cached_tokens or 0) == 0
    fresh = server.chat(steer, prompt=prompt, salt=uuid.uuid4().hex)
    assert victim.choices[0].message.content == fresh.choices[0].message.content
    again = server.chat(steer, prompt=prompt)
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # its own configuration still shares blocks
    assert again.choices[0].message.content == victim.choices[0].message.content


@pytest.mark.parametrize("body, field", [
    ({"splice_vector": "nope"}, "splice_vector"),
    ({"splice_vector": "v0", "splice_scale": "inf"}, "splice_scale"),
    ({"splice_vector": "v0", "splice_scale": "NaN-literal"}, "splice_scale"),
    ({"splice_vector": {"a": 1}}, "splice_vector"),
    ({"splice_vector": ["v0", "v1", "v2", "v3", "flat"]}, "splice_vector"),
])
def test_bad_steering_is_http_400_naming_the_field(server, body, field):
    import httpx

    raw = json.dumps({"model": server.model, "prompt": "hi", "max_tokens": 2, "vllm_xargs": body})
    raw = raw.replace('"NaN-literal"', "NaN")  # JSON clients cannot send NaN; raw HTTP can
    r = httpx.post(f"http://127.0.0.1:{server.port}/v1/completions", content=raw,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400
    assert f"vllm_xargs.{field}" in r.json()["error"]["message"]
    assert server.text(max_tokens=4)  # everyone else is still served


@pytest.mark.slow
def test_unsteered_requests_match_an_unpatched_server(server, tmp_path):
    from splice.serving import launch

    prompts = ["Hello, my name is", "The three primary colours are"]
    server.text({"splice_vector": "v2"})  # a steered request first: it must leave no trace
    patched = [server.completion(p) for p in prompts]
    port = _free_port()
    cmd = [launch.sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", server.model,
           "--port", str(port), "--max-model-len", "2048", "--dtype", "float32"]
    proc = _serve(cmd, tmp_path / "plain.log", port)
    try:
        plain = Server(port, server.model)
        assert [plain.completion(p) for p in prompts] == patched  # text and logprobs, bit for bit
    finally:
        launch.stop(proc)


@pytest.mark.slow
def test_recipe_that_does_not_fit_the_model_refuses_to_start(tmp_path):
    import subprocess

    from splice.bench.serve_recipe import write_recipe
    from splice.models.loader import default_model_dir
    from splice.serving import launch

    recipe = write_recipe(tmp_path, 64, 40, 1)  # hidden size 64 and 40 layers: not SmolLM2
    cmd = launch.command(recipe, ["--model", str(default_model_dir()), "--port", str(_free_port())])
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "RecipeError" in done.stdout + done.stderr
    assert "out of range: the model has layers 0..29" in done.stdout + done.stderr


def _parity_recipe(recipe: Path) -> Path:
    """The session recipe plus static skips (a whole layer, an attention, an MLP) and one entry of
    every kind splice.patch runs: ``in`` ablate, ``out`` clamp, a per-head vector at ``heads``, a head
    scale, a low-rank and an affine map, a token-gated vector, a vector on generated tokens only."""
    import torch
    import yaml

    from splice.steering.files import save_intervention
    from splice.steering.maps import Affine, LowRank
    from splice.vectors.io import save_vectors
    from splice.vectors.vector_set import VectorSet

    gen = torch.Generator().manual_seed(1)
    unit = lambda: torch.nn.functional.normalize(torch.randn(576, generator=gen), dim=0)  # noqa: E731
    d = recipe.parent
    save_intervention(LowRank(A={l: torch.randn(576, 8, generator=gen) / 24 for l in (3, 9)},
                              B={l: torch.randn(576, 8, generator=gen) / 4 for l in (3, 9)}), d / "lowrank.safetensors")
    save_intervention(Affine(a={l: 1 + 0.3 * torch.randn(576, generator=gen) for l in (4, 12)},
                             b={l: 0.5 * unit() for l in (4, 12)}, site="mlp"), d / "affine.safetensors")
    save_vectors(VectorSet({l: torch.randn(64, generator=gen) for l in (2, 3)}, site="heads", method="random"),
                 d / "head.safetensors")
    data = yaml.safe_load(recipe.read_text())
    vectors = data["steering"]["vectors"]
    for cfg in vectors.values():  # splice refuses steering a skipped part
        cfg["layers"] = [l for l in range(30) if l != 20]
    vectors["flat"]["layers"] = [10, 11, 12]
    vectors.update({
        "stream_in": {"file": "v1.safetensors", "site": "in", "op": "ablate", "layers": [6, 7, 8]},
        "clamp_out": {"file": "v2.safetensors", "op": "clamp", "lo": 2.0, "layers": [14, 15]},
        "head_vec": {"file": "head.safetensors", "site": "heads", "head": 4, "scale": 12.0},
        "prune": {"heads": {10: [2, 5], 11: [0]}},
        "lowrank": {"map": "lowrank.safetensors"},
        "affine": {"map": "affine.safetensors"},
        "gated": {"file": "v0.safetensors", "scale": 8.0, "layers": [16, 17, 18],
                  "gate": {"direction": "v1.safetensors", "threshold": 0.0, "temperature": 0.05}},
        "late": {"file": "v3.safetensors", "scale": 8.0, "positions": "generated", "layers": [9, 10]},
    })
    data["skip"] = {"layers": [20], "attn": [5], "mlp": [7]}
    out = recipe.with_name("parity.yaml")
    out.write_text(yaml.safe_dump(data))
    return out


PARITY_CASES = [None, [("v0", 6.0), ("flat", 1.0)], [("stream_in", 1.0), ("clamp_out", 1.0)],
                [("head_vec", 12.0), ("prune", 0.0)], [("lowrank", 1.0)], [("affine", 1.0)],
                [("gated", 8.0), ("late", 8.0)]]


@pytest.mark.slow
def test_float32_server_matches_hugging_face_with_the_same_recipe(recipe, tmp_path):
    """Every kind of intervention behind vLLM (static skips; add, ablate and clamp at sites in, out,
    mlp and heads; head scales; low-rank and affine maps; a token gate; a position range) gives the
    greedy text splice.patch gives on the Hugging Face model, for the same recipe and request."""
    import torch

    import splice
    from splice.models.loader import load_model
    from splice.serving import launch

    parity = _parity_recipe(recipe)
    prompts = ["Hello, my name is", "The best way to learn a language is"]
    model, tok = load_model()
    expected = []
    with splice.patch(model, recipe=parity) as p:
        for items in PARITY_CASES:
            p.set_slot(1, items or [])
            for prompt in prompts:
                ids = tok(prompt, return_tensors="pt").input_ids
                with torch.no_grad():
                    out = model.generate(ids, max_new_tokens=12, do_sample=False)
                expected.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))

    port = _free_port()
    cmd = launch.command(parity, ["--model", str(model.config._name_or_path), "--port", str(port),
                                  "--max-model-len", "512", "--dtype", "float32"])
    proc = _serve(cmd, tmp_path / "fp32.log", port)
    try:
        server = Server(port, str(model.config._name_or_path))

        def complete(job):
            items, prompt = job
            xargs = None if items is None else {"splice_vector": [n for n, _ in items],
                                                "splice_scale": [s for _, s in items]}
            r = server.client.completions.create(model=server.model, prompt=prompt, max_tokens=12,
                                                 temperature=0, extra_body={"vllm_xargs": xargs} if xargs else {})
            return r.choices[0].text

        jobs = [(items, prompt) for items in PARITY_CASES for prompt in prompts]
        got = [complete(job) for job in jobs]
        with ThreadPoolExecutor(len(jobs)) as pool:  # every kind in one batch: no request changes another's
            together = list(pool.map(complete, jobs[::-1]))[::-1]
    finally:
        launch.stop(proc)
    for case, (g, e) in enumerate(zip(got, expected)):
        assert g == e, (PARITY_CASES[case // 2], g, e)
    assert together == got
    plain = expected[:2]
    assert all(expected[i:i + 2] != plain for i in range(2, len(expected), 2)), "a case that changes nothing proves nothing"


@pytest.mark.slow
@pytest.mark.skipif(not has_wna16_kernel(), reason=WNA16_MISSING)
def test_a_quantized_export_serves_with_per_request_steering(recipe, tmp_path):
    """4-bit weights reach vLLM through the compressed-tensors export (float16, vLLM's CPU kernel),
    under the same recipe: unsteered greedy text equals splice's own quantized model's, and a
    request's vector changes its output."""
    import torch

    from splice.models.loader import load_model
    from splice.quant.apply import quantize_model
    from splice.quant.compressed_tensors_export import export_compressed_tensors
    from splice.quant.plan import QuantPlan
    from splice.serving import launch

    model, tok = load_model()
    quantize_model(model, QuantPlan.uniform(model, 4, group_size=64), "rtn_int")
    out = export_compressed_tensors(model, tmp_path / "ct", tokenizer=tok)
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    expected = tok.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)

    port = _free_port()
    proc = _serve(launch.command(recipe, ["--model", str(out), "--port", str(port), "--max-model-len", "512"]),
                  tmp_path / "quant.log", port)
    try:
        server = Server(port, str(out))

        def complete(xargs=None):
            r = server.client.completions.create(model=server.model, prompt=prompt, max_tokens=8, temperature=0,
                                                 extra_body={"vllm_xargs": xargs} if xargs else {})
            return r.choices[0].text

        plain = complete()
        steered = complete({"splice_vector": "v0", "splice_scale": 8.0})
        assert complete() == plain
    finally:
        launch.stop(proc)
    assert "compressed-tensors" in (tmp_path / "quant.log").read_text()
    assert plain == expected
    assert steered != plain


@pytest.mark.slow
def test_the_readme_serving_example_as_written(tmp_path):
    """README, "Serving behind vLLM": its ``splice extract``, its recipe, its ``splice serve`` line (on a
    free port) and its client block, run as written; the steered reply is sensible text that differs
    from the unsteered reply to the same request."""
    import contextlib
    import re
    import shlex
    import sys

    from test_readme_examples import assert_sensible, block

    from splice.cli import main
    from splice.serving import launch

    bash, client = block("Serving behind vLLM", "bash").code, block("Serving behind vLLM", "python").code
    lines = [line.split("#")[0].strip() for line in bash.splitlines()]
    extract = next(shlex.split(line) for line in lines if line.startswith("splice extract"))
    with contextlib.chdir(tmp_path):
        assert main(extract[1:]) == 0
    (tmp_path / "serve.yaml").write_text(re.search(r"<<'YAML'\n(.*?)\nYAML", bash, re.S).group(1) + "\n")
    serve = next(shlex.split(line) for line in lines if " splice serve " in f" {line} ")
    env = _env()
    while "=" in serve[0]:
        key, value = serve.pop(0).split("=", 1)
        env[key] = value
    port = _free_port()
    args = [str(port) if previous == "--port" else a for previous, a in zip([None] + serve, serve)]
    assert args[:2] == ["splice", "serve"] and "--port" in args
    with contextlib.chdir(tmp_path):
        proc = launch.start_ready([sys.executable, "-m", "splice.cli", *args[1:]], port, tmp_path / "serve.log", env)
    try:
        namespace = {}
        exec(compile(client.replace("localhost:8000", f"127.0.0.1:{port}"), "README client", "exec"), namespace)
        steered = namespace["reply"].choices[0].message.content
        plain = namespace["client"].chat.completions.create(
            model=namespace["model"], messages=[{"role": "user", "content": "Tell me about your weekend."}],
            max_tokens=48, temperature=0).choices[0].message.content
    finally:
        launch.stop(proc)
    from transformers import AutoTokenizer

    from splice.models.loader import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    assert_sensible(tok, steered)
    assert steered != plain
