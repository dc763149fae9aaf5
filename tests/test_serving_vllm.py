"""End to end behind a real vLLM server (the default model): steering per request, isolation between
requests, prefix-cache separation, HTTP 400s and refusals. One patched server serves the session.

Servers run in float32: in bfloat16 vLLM's own greedy output already depends on what else is in the
batch and on prefix-cache hits (different matmul shapes round differently), which would hide
whether one request's steering leaks into another."""

import contextlib
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
ADMIN_TOKEN = "admin-" + "7f" * 20  # the session server's admin token (SPLICE_ADMIN_TOKEN)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it for kernels
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["SPLICE_SERVE_SECRET"] = SECRET
    env["SPLICE_ADMIN_TOKEN"] = ADMIN_TOKEN
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
                                  "--dtype", "float32", "--enable-prompt-tokens-details"],
                         registry=str(tmp_path_factory.mktemp("registry")))
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


def _random_vectors(path: Path, seed: int, hidden: int = 576) -> Path:
    import torch

    from splice.vectors.io import save_vectors
    from splice.vectors.vector_set import VectorSet

    gen = torch.Generator().manual_seed(seed)
    unit = lambda: torch.nn.functional.normalize(torch.randn(hidden, generator=gen), dim=0)  # noqa: E731
    save_vectors(VectorSet({l: unit() for l in range(30)}, site="out", method="random"), path)
    return path


def test_vectors_registered_replaced_and_deleted_at_run_time(server, recipe, tmp_path):
    """The admin endpoint on a real server: a registered copy of the recipe's v0 steers as v0 does;
    replacing its tensors under the same name changes the text and reuses no cached block; putting the
    first tensors back gives the first version and text again; a bad upload is refused naming the
    field and changes nothing; a deleted name is a 400; a client's own splice_version is ignored."""
    import httpx

    from splice.serving.client import AdminClient, AdminError

    admin = AdminClient(f"http://127.0.0.1:{server.port}", ADMIN_TOKEN)
    base = f"http://127.0.0.1:{server.port}/splice/v1/interventions"
    assert httpx.get(base, timeout=30).status_code == 401
    assert httpx.get(base, headers={"Authorization": "Bearer " + "x" * 40}, timeout=30).status_code == 403
    preamble = "A long briefing that every tenant of this service reads first. " * 20 + "Summarise it."
    first = admin.register_vectors("tenant", recipe.parent / "v0.safetensors", scale=8.0)
    assert admin.list()["registered"] == {"tenant": first["version"]}

    def cached(xargs):
        return server.chat(xargs, prompt=preamble, max_tokens=2).usage.prompt_tokens_details.cached_tokens or 0

    with_first = server.text({"splice_vector": "tenant"})
    assert with_first == server.text({"splice_vector": "v0", "splice_scale": 8.0}) != server.text()
    cached({"splice_vector": "tenant"})
    assert cached({"splice_vector": "tenant"}) > 0  # its own blocks are shared

    second = admin.register_vectors("tenant", _random_vectors(tmp_path / "w.safetensors", 7), scale=8.0)
    assert second["version"] != first["version"]
    assert cached({"splice_vector": "tenant"}) == 0  # blocks computed with the old tensors are never reused
    with_second = server.text({"splice_vector": "tenant"})
    assert with_second not in (with_first, server.text())
    assert server.text({"splice_vector": "tenant", "splice_version": first["version"]}) == with_second

    with pytest.raises(AdminError) as refused:
        admin.register_vectors("tenant", _random_vectors(tmp_path / "small.safetensors", 3, hidden=64), scale=8.0)
    assert refused.value.status == 400 and refused.value.body["error"]["param"] == "entry"
    assert admin.list()["registered"] == {"tenant": second["version"]}
    assert server.text({"splice_vector": "tenant"}) == with_second

    again = admin.register_vectors("tenant", recipe.parent / "v0.safetensors", scale=8.0)
    assert again["version"] == first["version"]
    assert server.text({"splice_vector": ["tenant", "v1"], "splice_scale": [8.0, 0.0]}) == with_first

    admin.delete("tenant")
    r = httpx.post(f"http://127.0.0.1:{server.port}/v1/completions", timeout=60,
                   json={"model": server.model, "prompt": "hi", "max_tokens": 2, "vllm_xargs": {"splice_vector": "tenant"}})
    assert r.status_code == 400 and "vllm_xargs.splice_vector" in r.json()["error"]["message"]
    assert admin.list()["registered"] == {} and admin.list()["slots"]["in_use"] == 0


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


def _parity_recipe(recipe: Path, condition) -> Path:
    """The session recipe plus static skips (a whole layer, an attention, an MLP) and one entry of
    every kind splice.patch runs: ``in`` ablate, ``out`` clamp, a per-head vector at ``heads``, a head
    scale, a low-rank and an affine map, a token-gated vector, a vector on generated tokens only, and
    a vector gated by the CAST ``condition``."""
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
    save_intervention(condition, d / "condition.safetensors")
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
        "cast": {"file": "v2.safetensors", "scale": 16.0, "layers": list(range(8, 20)),
                 "gate": {"condition": "condition.safetensors"}},
    })
    data["skip"] = {"layers": [20], "attn": [5], "mlp": [7]}
    out = recipe.with_name("parity.yaml")
    out.write_text(yaml.safe_dump(data))
    return out


def _condition_between(model, tok, prompts, layer):
    """A CAST condition at ``layer`` met by the first prompt and not the second: its vector is the
    difference of their pooled hidden states there, its threshold halfway between their scores."""
    import torch

    from splice.steering.gates import Condition

    pooled = []
    for prompt in prompts:
        with torch.no_grad():
            h = model(tok(prompt, return_tensors="pt").input_ids, output_hidden_states=True).hidden_states[layer]
        pooled.append(h[0, 1:].float().mean(0))  # CAST's mean, without the attention sink
    probe = Condition(pooled[0] - pooled[1], layer, threshold=0.0)
    scores = [float(probe.score(p[None, None], torch.ones(1, 1))) for p in pooled]
    assert scores[0] > scores[1]
    return Condition(probe.vector, layer, threshold=sum(scores) / 2)


PARITY_CASES = [None, [("v0", 6.0), ("flat", 1.0)], [("stream_in", 1.0), ("clamp_out", 1.0)],
                [("head_vec", 12.0), ("prune", 0.0)], [("lowrank", 1.0)], [("affine", 1.0)],
                [("gated", 8.0), ("late", 8.0)], [("cast", 16.0)]]


@pytest.mark.slow
def test_float32_server_matches_hugging_face_with_the_same_recipe(recipe, tmp_path):
    """Every kind of intervention behind vLLM (static skips; add, ablate and clamp at sites in, out,
    mlp and heads; head scales; low-rank and affine maps; a token gate; a position range; a CAST
    condition that steers one prompt and not the other) gives the greedy text splice.patch gives on
    the Hugging Face model, for the same recipe and request."""
    import torch

    import splice
    from splice.models.loader import load_model
    from splice.serving import launch

    prompts = ["Hello, my name is", "The best way to learn a language is"]
    model, tok = load_model()
    # layer 4: its input is the same patched or not (the first static skip is layer 5's attention)
    parity = _parity_recipe(recipe, _condition_between(model, tok, prompts, layer=4))
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
    steered, unmet = expected[-2:]  # the CAST case: the condition steers the first prompt only
    assert steered != plain[0] and unmet == plain[1], (steered, unmet, plain)


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


def _readme_server(tmp_path, section: str):
    """Run "Serving behind vLLM"'s ``splice extract`` and recipe in ``tmp_path``, then ``section``'s
    bash block as written: its ``export``s and its ``splice serve`` line (on a free port). Returns
    (process, port, environment)."""
    import re
    import shlex
    import subprocess
    import sys

    from test_readme_examples import block

    from splice.cli import main
    from splice.serving import launch

    first = block("Serving behind vLLM", "bash").code
    lines = [line.split("#")[0].strip() for line in first.splitlines()]
    extract = next(shlex.split(line) for line in lines if line.startswith("splice extract"))
    with contextlib.chdir(tmp_path):
        assert main(extract[1:]) == 0
    (tmp_path / "serve.yaml").write_text(re.search(r"<<'YAML'\n(.*?)\nYAML", first, re.S).group(1) + "\n")
    lines = [line.split("#")[0].strip() for line in block(section, "bash").code.replace("\\\n", " ").splitlines()]
    env = _env()
    for line in lines:
        if line.startswith("export "):
            key = line[len("export "):].split("=", 1)[0]
            env[key] = subprocess.run(["bash", "-c", f"{line}; echo ${key}"], capture_output=True, text=True,
                                      check=True, env=env).stdout.strip()
    serve = next(shlex.split(line) for line in lines if " splice serve " in f" {line} ")
    while "=" in serve[0]:
        key, value = serve.pop(0).split("=", 1)
        env[key] = value
    port = _free_port()
    args = [str(port) if previous == "--port" else a for previous, a in zip([None] + serve, serve)]
    assert args[:2] == ["splice", "serve"] and "--port" in args
    with contextlib.chdir(tmp_path):
        proc = launch.start_ready([sys.executable, "-m", "splice.cli", *args[1:]], port, tmp_path / "serve.log", env)
    return proc, port, env


def _run_client(code: str, port: int, tmp_path, env: dict) -> dict:
    """Execute a README client block against the server on ``port``, in ``tmp_path`` with ``env``."""
    namespace = {}
    with contextlib.chdir(tmp_path), pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        exec(compile(code.replace("localhost:8000", f"127.0.0.1:{port}"), "README client", "exec"), namespace)
    return namespace


def _unsteered_weekend(namespace) -> str:
    return namespace["client"].chat.completions.create(
        model=namespace["model"], messages=[{"role": "user", "content": "Tell me about your weekend."}],
        max_tokens=48, temperature=0).choices[0].message.content


@pytest.mark.slow
def test_the_readme_serving_example_as_written(tmp_path):
    """README, "Serving behind vLLM": its ``splice extract``, its recipe, its ``splice serve`` line (on a
    free port) and its client block, run as written; the steered reply is sensible text that differs
    from the unsteered reply to the same request."""
    from test_readme_examples import assert_sensible, block
    from transformers import AutoTokenizer

    from splice.models.loader import default_model_dir
    from splice.serving import launch

    proc, port, env = _readme_server(tmp_path, "Serving behind vLLM")
    try:
        namespace = _run_client(block("Serving behind vLLM", "python").code, port, tmp_path, env)
        steered, plain = namespace["reply"].choices[0].message.content, _unsteered_weekend(namespace)
    finally:
        launch.stop(proc)
    assert_sensible(AutoTokenizer.from_pretrained(default_model_dir()), steered)
    assert steered != plain


@pytest.mark.slow
def test_the_readme_registry_example_as_written(tmp_path):
    """README, "Serving in production": its server line (a registry, a generated admin token) and its
    client block, run as written: the vector registered at run time steers the reply (sensible text,
    not the unsteered reply), and after the block's delete the name is gone and no slot is held."""
    from test_readme_examples import assert_sensible, block
    from transformers import AutoTokenizer

    from splice.models.loader import default_model_dir
    from splice.serving import launch

    proc, port, env = _readme_server(tmp_path, "Serving in production")
    try:
        namespace = _run_client(block("Serving in production", "python").code, port, tmp_path, env)
        steered, plain = namespace["reply"].choices[0].message.content, _unsteered_weekend(namespace)
        listing = namespace["admin"].list()
    finally:
        launch.stop(proc)
    assert_sensible(AutoTokenizer.from_pretrained(default_model_dir()), steered)
    assert steered != plain
    assert listing["registered"] == {} and listing["slots"]["in_use"] == 0
    assert len(env["SPLICE_ADMIN_TOKEN"]) >= 32


@pytest.mark.slow
def test_windowed_layers_serve_as_vllm_sliding_windows(tmp_path):
    """A head map whose first 15 layers are all-windowed (4 tokens, no sinks) behind vLLM: its layers
    get vLLM's per-layer sliding windows, and greedy float32 text equals splice.patch's on Hugging Face
    with the same map, over prompts longer than the window (a window one token off changes the text)."""
    import torch

    import splice
    from splice.hybrid.head_map import HeadMap
    from splice.models.loader import load_model
    from splice.serving import launch

    model, tok = load_model()
    full = {l: set() if l < 15 else {0, 1, 2} for l in range(30)}
    heads = HeadMap(30, 3, full, sinks=0, window=4, kind="window")
    heads.save(tmp_path / "heads.json")
    prompts = ["Hello, my name is", "The best way to learn a new language is to practise every day with"]
    expected, plain = [], []
    for out in (expected, plain):
        with splice.patch(model, heads=heads) if out is expected else contextlib.nullcontext():
            for prompt in prompts:
                ids = tok(prompt, return_tensors="pt").input_ids
                with torch.no_grad():
                    gen = model.generate(ids, max_new_tokens=12, do_sample=False)
                out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    assert expected != plain  # the windows matter for these prompts

    from splice.bench.serve_recipe import write_recipe

    recipe = write_recipe(tmp_path / "recipe", 576, 30, 1)
    port = _free_port()
    cmd = launch.command(recipe, ["--model", str(model.config._name_or_path), "--port", str(port),
                                  "--max-model-len", "512", "--dtype", "float32"], head_map=str(tmp_path / "heads.json"))
    proc = _serve(cmd, tmp_path / "windows.log", port)
    try:
        server = Server(port, str(model.config._name_or_path))
        got = [server.client.completions.create(model=server.model, prompt=p, max_tokens=12, temperature=0)
               .choices[0].text for p in prompts]
    finally:
        launch.stop(proc)
    assert got == expected
