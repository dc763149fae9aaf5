"""The admin endpoint, the registry and the slot bound at the HTTP edge (no vLLM server): auth,
refusals that change nothing, versions that change salts, and 503 when every slot is held."""

import asyncio
import base64
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from splice.bench.serve_recipe import write_recipe
from splice.serving import salts
from splice.serving.admission import Admission, SlotsBusy
from splice.serving.catalog import TOKEN_ENV
from splice.serving.middleware import SteeringMiddleware
from splice.serving.registry import Registry
from splice.vectors.io import save_vectors
from splice.vectors.vector_set import VectorSet

TOKEN = "t" * 40
HIDDEN, LAYERS = 8, 2


def _vector_file(path, seed=0, hidden=HIDDEN, site="out", nan=False):
    gen = torch.Generator().manual_seed(seed)
    save_vectors(VectorSet({l: torch.randn(hidden, generator=gen) for l in range(LAYERS)}, site=site,
                           method="random"), path)
    if nan:  # the same file with one NaN, which no VectorSet would hold
        with safe_open(path, framework="pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        next(iter(tensors.values()))[0] = float("nan")
        save_file(tensors, path, metadata)
    return path.read_bytes()


def _upload(data: bytes, **entry) -> dict:
    return {"entry": {"file": "v.safetensors", **entry}, "files": {"v.safetensors": base64.b64encode(data).decode()}}


class Edge:
    """One middleware over a fake vLLM app whose config has the test recipe and a registry."""

    def __init__(self, tmp_path, monkeypatch, **options):
        monkeypatch.setenv(TOKEN_ENV, TOKEN)
        recipe = write_recipe(tmp_path / "recipe", HIDDEN, LAYERS, 2)
        self.registry = tmp_path / "registry"
        extra = {"recipe": str(recipe), "registry": str(self.registry), **options}
        config = SimpleNamespace(load_config=SimpleNamespace(load_format="splice", model_loader_extra_config=extra),
                                 model_config=SimpleNamespace(hf_config=SimpleNamespace(
                                     num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=2)),
                                 scheduler_config=SimpleNamespace(max_num_seqs=4))
        self.app_state = SimpleNamespace(state=SimpleNamespace(vllm_config=config))
        self.seen = []
        self.middleware = SteeringMiddleware(self._vllm)
        self.gate = None  # an asyncio.Event the fake vLLM waits on, when set

    async def _vllm(self, scope, receive, send):
        self.seen.append(json.loads((await receive())["body"]))
        if self.gate is not None:
            await self.gate.wait()

    async def acall(self, method, path, body=None, token=TOKEN):
        sent = []
        raw = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        headers = [(b"content-type", b"application/json")]
        if token is not None:
            headers.append((b"authorization", f"Bearer {token}".encode()))

        async def receive():
            return {"type": "http.request", "body": raw, "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": method, "path": path, "app": self.app_state, "headers": headers}
        await self.middleware(scope, receive, send)
        if not sent:
            return 200, self.seen[-1], {}
        return sent[0]["status"], json.loads(sent[1]["body"]), dict(sent[0]["headers"])

    def call(self, *args, **kw):
        return asyncio.run(self.acall(*args, **kw))

    def put(self, name, body, **kw):
        return self.call("PUT", f"/splice/v1/interventions/{name}", body, **kw)

    def steer(self, xargs):
        return self.call("POST", "/v1/chat/completions", {"messages": [], "vllm_xargs": xargs})

    def files(self):
        return sorted(p.relative_to(self.registry).as_posix() for p in self.registry.rglob("*"))


@pytest.fixture
def edge(tmp_path, monkeypatch):
    return Edge(tmp_path, monkeypatch)


def test_the_admin_endpoint_needs_the_token(edge, tmp_path):
    status, body, headers = edge.call("GET", "/splice/v1/interventions", token=None)
    assert status == 401 and headers[b"www-authenticate"] == b"Bearer" and body["error"]["param"] == "authorization"
    assert edge.call("GET", "/splice/v1/interventions", token="x" * 40)[0] == 403
    data = _vector_file(tmp_path / "a.safetensors")
    assert edge.put("mine", _upload(data), token=TOKEN[:-1] + "u")[0] == 403
    status, body, _ = edge.call("GET", "/splice/v1/interventions")
    assert status == 200 and body["registered"] == {} and body["recipe"] == ["v0", "v1"]


def test_without_a_registry_the_endpoint_is_off(tmp_path):
    recipe = write_recipe(tmp_path, HIDDEN, LAYERS, 1)
    load = SimpleNamespace(load_format="splice", model_loader_extra_config={"recipe": str(recipe)})
    config = SimpleNamespace(load_config=load, scheduler_config=SimpleNamespace(max_num_seqs=4),
                             model_config=SimpleNamespace(hf_config=SimpleNamespace(
                                 num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=2)))
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "GET", "path": "/splice/v1/interventions", "headers": [],
             "app": SimpleNamespace(state=SimpleNamespace(vllm_config=config))}
    asyncio.run(SteeringMiddleware(None)(scope, receive, send))
    assert sent[0]["status"] == 404 and b"registry" in sent[1]["body"]


def test_register_steer_replace_delete(edge, tmp_path):
    first = _vector_file(tmp_path / "a.safetensors", seed=1)
    status, body, _ = edge.put("mine", _upload(first, scale=3.0))
    assert status == 201 and len(body["version"]) == 32
    v1 = body["version"]
    status, seen, _ = edge.steer({"splice_vector": ["mine", "v0"], "splice_version": ["forged", "x"]})
    xargs = seen["vllm_xargs"]
    assert status == 200 and xargs["splice_version"] == [v1, ""] and xargs["splice_scale"] == [3.0, 4.0]
    salt_v1 = seen["cache_salt"]
    # the same contents again: the same version, so the same salt (blocks computed with it are valid)
    assert edge.put("mine", _upload(first, scale=3.0))[:2] == (200, {"name": "mine", "version": v1})
    assert edge.steer({"splice_vector": ["mine", "v0"]})[1]["cache_salt"] == salt_v1
    # new tensors under the same name: a new version and a new salt; the old files are gone (nothing in flight)
    status, body, _ = edge.put("mine", _upload(_vector_file(tmp_path / "b.safetensors", seed=2), scale=3.0))
    v2 = body["version"]
    assert status == 200 and v2 != v1
    seen = edge.steer({"splice_vector": ["mine", "v0"]})[1]
    assert seen["vllm_xargs"]["splice_version"] == [v2, ""] and seen["cache_salt"] != salt_v1
    assert not (edge.registry / v1).exists() and (edge.registry / v2 / "v.safetensors").is_file()
    assert Registry(edge.registry).load("mine", v2).vector[0].shape == (HIDDEN,)
    assert edge.call("DELETE", "/splice/v1/interventions/mine")[:2] == (200, {"name": "mine", "version": v2})
    status, body, _ = edge.steer({"splice_vector": "mine"})
    assert status == 400 and "unknown vector 'mine'" in body["error"]["message"]
    assert edge.call("DELETE", "/splice/v1/interventions/mine")[0] == 404
    assert edge.files() == ["names.json"]


def test_registrations_survive_a_restart(edge, tmp_path, monkeypatch):
    version = edge.put("kept", _upload(_vector_file(tmp_path / "a.safetensors")))[1]["version"]
    again = Edge(tmp_path, monkeypatch)
    assert again.steer({"splice_vector": "kept"})[1]["vllm_xargs"]["splice_version"] == [version]


def _bad_uploads(tmp_path):
    good = _vector_file(tmp_path / "good.safetensors")
    encoded = base64.b64encode(good).decode()
    yield "files", {"entry": {"file": "../x.safetensors"}, "files": {"../x.safetensors": encoded}}
    yield "entry.file", {"entry": {"file": "/etc/passwd"}, "files": {"v.safetensors": encoded}}
    yield "files", {"entry": {"file": "v.safetensors"}, "files": {"v.safetensors": encoded, "w.safetensors": encoded}}
    yield "files.v.safetensors", {"entry": {"file": "v.safetensors"}, "files": {"v.safetensors": "not base64!"}}
    yield "body", {"entry": {"file": "v.safetensors"}, "files": {}, "path": "/tmp"}
    yield "entry", _upload(_vector_file(tmp_path / "wide.safetensors", hidden=HIDDEN + 1))
    yield "entry", _upload(_vector_file(tmp_path / "nan.safetensors", nan=True))
    yield "entry", _upload(good, op="shift")
    yield "entry", _upload(good, layers=[0, 5])
    yield "entry", _upload(b"not a safetensors file")
    yield "entry", _upload(_vector_file(tmp_path / "in.safetensors", site="in"), site="in")  # no tables at 'in'
    yield "body", b"{not json"


def test_bad_registrations_name_the_field_and_change_nothing(edge, tmp_path):
    version = edge.put("kept", _upload(_vector_file(tmp_path / "a.safetensors")))[1]["version"]
    before = edge.files()
    for field, body in _bad_uploads(tmp_path):
        status, answer, _ = edge.put("kept", body)
        assert (status, answer["error"]["param"]) == (400, field), (field, answer)
    status, answer, _ = edge.put("bad name!", _upload(_vector_file(tmp_path / "b.safetensors")))
    assert (status, answer["error"]["param"]) == (400, "name")
    assert edge.put("v0", _upload(_vector_file(tmp_path / "c.safetensors")))[0] == 409  # the recipe's own
    assert edge.files() == before
    assert edge.steer({"splice_vector": "kept"})[1]["vllm_xargs"]["splice_version"] == [version]


def test_oversized_uploads_get_413(tmp_path, monkeypatch):
    edge = Edge(tmp_path, monkeypatch, max_upload_mb=1)
    status, body, _ = edge.put("big", _upload(b"x" * (1 << 20)))
    assert status == 413 and body["error"]["param"] == "body" and edge.files() == []


def test_a_request_that_overflows_the_tables_is_refused(tmp_path, monkeypatch):
    edge = Edge(tmp_path, monkeypatch, registry_tables={"out": 1})
    for i, name in enumerate(("a", "b", "c")):  # the recipe's two vectors make the 'out' tables 2 entries wide
        assert edge.put(name, _upload(_vector_file(tmp_path / f"{name}.safetensors", seed=i)))[0] == 201
    assert edge.steer({"splice_vector": "a"})[0] == 200
    assert edge.steer({"splice_vector": ["a", "b"]})[0] == 200
    status, body, _ = edge.steer({"splice_vector": ["a", "b", "c"]})
    assert status == 400 and "3 table entries at layer 0 site 'out'" in body["error"]["message"]


def test_admission_bounds_distinct_configurations():
    async def scenario():
        admission = Admission(1, wait_s=0.05)
        async with admission.hold("a", ("v1",)):
            async with admission.hold("a"):  # the same configuration shares its slot
                assert admission.held["a"] == 2 and admission.versions["v1"] == 1
            with pytest.raises(SlotsBusy):
                async with admission.hold("b"):
                    pytest.fail("admitted a second configuration with the only slot held")
        freed = []
        async with admission.hold("b", on_release=freed.extend):
            assert dict(admission.held) == {"b": 1}
        waiter = asyncio.ensure_future(_hold_after(admission))
        async with admission.hold("a", ("v1",), on_release=freed.extend):
            await asyncio.sleep(0.01)
            assert not waiter.done()  # "c" waits for "a"'s slot
        assert await waiter == "c" and freed == ["v1"] and not admission.held
    asyncio.run(scenario())


async def _hold_after(admission):
    async with admission.hold("c"):
        return "c"


def test_a_request_with_every_slot_held_gets_503(tmp_path, monkeypatch):
    edge = Edge(tmp_path, monkeypatch, max_slots=1, slot_wait_s=0.05)

    async def scenario():
        edge.gate = asyncio.Event()  # the fake vLLM holds every request until it is set
        busy = asyncio.ensure_future(edge.acall("POST", "/v1/chat/completions", {"vllm_xargs": {"splice_vector": "v0"}}))
        await asyncio.sleep(0.01)
        status, body, headers = await edge.acall("POST", "/v1/chat/completions", {"vllm_xargs": {"splice_vector": "v1"}})
        assert status == 503 and headers[b"retry-after"] == b"1" and "steering slots" in body["error"]["message"]
        shared = asyncio.ensure_future(edge.acall("POST", "/v1/completions", {"vllm_xargs": {"splice_vector": "v0"}}))
        unsteered = asyncio.ensure_future(edge.acall("POST", "/v1/completions", {"prompt": "hi"}))
        await asyncio.sleep(0.01)
        assert len(edge.seen) == 3  # the same configuration shares the slot; unsteered requests need none
        edge.gate.set()
        assert [(await t)[0] for t in (busy, shared, unsteered)] == [200, 200, 200]
        assert (await edge.acall("POST", "/v1/chat/completions", {"vllm_xargs": {"splice_vector": "v1"}}))[0] == 200
        assert not edge.middleware.catalog.admission.held
    asyncio.run(scenario())


def test_the_catalog_takes_a_recipe_with_head_scales(tmp_path):
    """A head scale's entries need the head size, which the API server's catalog learns from the
    model's configuration (a recipe with one once made every steered request a 500)."""
    import yaml

    from splice.serving.catalog import Catalog

    recipe = write_recipe(tmp_path, HIDDEN, LAYERS, 1)
    data = yaml.safe_load(recipe.read_text())
    data["steering"]["vectors"]["prune"] = {"heads": {1: [0]}}
    recipe.write_text(yaml.safe_dump(data))
    config = SimpleNamespace(load_config=SimpleNamespace(load_format="splice", model_loader_extra_config={"recipe": str(recipe)}),
                             model_config=SimpleNamespace(hf_config=SimpleNamespace(
                                 num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=2)),
                             scheduler_config=SimpleNamespace(max_num_seqs=4))
    steering = Catalog(config).resolve({"splice_vector": ["prune", "v0"]})
    assert steering.items == (("prune", 0.0), ("v0", 4.0))


def test_only_the_server_says_a_request_skips_the_prefix_cache(edge):
    """``splice_whole_prompt`` (no prefix-cache reads, for CAST conditions) is the middleware's: a
    client's is dropped, and a recipe without a condition never gets one."""
    status, body, _ = edge.steer({"splice_vector": "v0", "splice_whole_prompt": True})
    assert status == 200 and "splice_whole_prompt" not in body["vllm_xargs"]


def test_versions_enter_the_salt_and_the_mark():
    from splice.serving.request_params import RequestSteering

    a = RequestSteering((("mine", 1.0),), ("a" * 32,))
    b = RequestSteering((("mine", 1.0),), ("b" * 32,))
    assert a.key != b.key and salts.steered_salt(a.key, None) != salts.steered_salt(b.key, None)
