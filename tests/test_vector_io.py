"""Vector files: splice safetensors and llama.cpp control vectors (GGUF)."""

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from splice.vectors import io as vio
from splice.vectors.gguf_control import export_control_vector, import_control_vector, to_out_site
from splice.vectors.io import load_vectors, save_vectors
from splice.vectors.vector_set import VectorSet, gguf_arch

H = 16


def _vs(layers=(1, 3, 7), site="out", **kw):
    g = torch.Generator().manual_seed(0)
    return VectorSet({layer: torch.randn(H, generator=g) for layer in layers}, site=site, **kw)


def _same(a: VectorSet, b: VectorSet):
    assert a.layers == b.layers
    assert all(torch.equal(a[layer], b[layer]) for layer in a.layers)
    assert (a.site, a.model, a.arch, a.method, a.metadata) == (b.site, b.model, b.arch, b.method, b.metadata)


def _safetensors(path, tensors, **meta):
    meta = {"format": "splice.vectors", "version": "1", "site": "out",
            "hidden_size": str(H), **meta}
    save_file(tensors, path, metadata=meta)
    return path


def _gguf(path, tensors, arch="controlvector", hint="llama"):
    """A control-vector file written the way llama.cpp's tools and repeng write them."""
    w = gguf.GGUFWriter(path, arch)
    w.add_string(f"{arch}.model_hint", hint)
    w.add_uint32(f"{arch}.layer_count", len(tensors))
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _vec(size=H):
    return np.arange(size, dtype=np.float32)


# --- safetensors ---------------------------------------------------------------------------

def test_safetensors_round_trip_bit_exact(tmp_path):
    vs = _vs(model="SmolLM2-135M-Instruct", arch="llama", method="mean_diff",
             metadata={"concept": "happy", "n_pairs": "32"})
    vs.directions[3][0] = float.fromhex("0x1.fffffep+127")  # extreme but finite values survive
    vs.directions[3][1] = float.fromhex("0x1p-149")
    save_vectors(vs, tmp_path / "v.safetensors")
    _same(load_vectors(tmp_path / "v.safetensors", expect_hidden_size=H), vs)


def test_safetensors_round_trip_site_in_and_no_model(tmp_path):
    vs = _vs(layers=(0, 2), site="in")
    save_vectors(vs, tmp_path / "v.safetensors")
    _same(load_vectors(str(tmp_path / "v.safetensors")), vs)


def test_safetensors_layout(tmp_path):
    save_vectors(_vs(model="m", metadata={"k": "v"}), tmp_path / "v.safetensors")
    with safe_open(tmp_path / "v.safetensors", framework="pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == ["layer.1", "layer.3", "layer.7"]
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())
    assert meta["format"] == "splice.vectors" and meta["version"] == "1"
    assert meta["site"] == "out" and meta["hidden_size"] == str(H) and meta["model"] == "m"
    assert meta["user.k"] == "v" and "method" not in meta and "arch" not in meta
    assert "hidden_states[l + 1]" in meta["layers"]


def test_expect_hidden_size_mismatch(tmp_path):
    save_vectors(_vs(), tmp_path / "v.safetensors")
    with pytest.raises(ValueError, match=f"hidden size {H}, expected 576"):
        load_vectors(tmp_path / "v.safetensors", expect_hidden_size=576)


@pytest.mark.parametrize("tensors, meta, match", [
    ({"layer.1": torch.tensor([1.0, float("nan")] + [0.0] * (H - 2))}, {}, "NaN or inf"),
    ({"layer.1": torch.full((H,), float("inf"))}, {}, "NaN or inf"),
    ({"layer.1": torch.zeros(H + 1)}, {}, "expected a 1-D float tensor of size 16"),
    ({"layer.1": torch.zeros(2, H)}, {}, "expected a 1-D float tensor"),
    ({"layer.1": torch.zeros(H, dtype=torch.int32)}, {}, "expected a 1-D float tensor"),
    ({"layer.x": torch.zeros(H)}, {}, "not of the form layer.<index>"),
    ({"layer.01": torch.zeros(H)}, {}, "not of the form layer.<index>"),
    ({"direction.1": torch.zeros(H)}, {}, "not of the form layer.<index>"),
    ({"layer.1": torch.zeros(H)}, {"format": "pt"}, "not a splice vector file"),
    ({"layer.1": torch.zeros(H)}, {"version": "2"}, "unsupported splice.vectors version"),
    ({"layer.1": torch.zeros(H)}, {"hidden_size": "big"}, "bad hidden_size"),
    ({"layer.1": torch.zeros(H)}, {"site": "middle"}, "unknown site"),
    ({}, {}, "at least one layer"),
])
def test_load_rejects_bad_content(tmp_path, tensors, meta, match):
    path = _safetensors(tmp_path / "bad.safetensors", tensors, **meta)
    with pytest.raises(ValueError, match=match) as e:
        load_vectors(path)
    assert str(path) in str(e.value)


def test_load_rejects_plain_safetensors(tmp_path):
    save_file({"layer.1": torch.zeros(H)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a splice vector file"):
        load_vectors(tmp_path / "plain.safetensors")


@pytest.mark.parametrize("cut", [b"", b"not a safetensors file at all", "half", "minus_one"])
def test_load_rejects_malformed_and_truncated(tmp_path, cut):
    good = tmp_path / "v.safetensors"
    save_vectors(_vs(), good)
    data = good.read_bytes()
    body = {"half": data[: len(data) // 2], "minus_one": data[:-1]}.get(cut, cut)
    (tmp_path / "bad.safetensors").write_bytes(body)
    with pytest.raises(ValueError, match="bad.safetensors is not a valid safetensors file"):
        load_vectors(tmp_path / "bad.safetensors")


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no vector file"):
        load_vectors(tmp_path / "missing.safetensors")


def test_failed_save_leaves_destination_untouched(tmp_path, monkeypatch):
    dest = tmp_path / "v.safetensors"
    dest.write_bytes(b"previous contents")

    def broken_fsync(fd):  # the temp file is fully written by now
        raise OSError("disk full")

    monkeypatch.setattr(vio.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_vectors(_vs(), dest)
    assert dest.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.safetensors"]


def test_save_rejects_non_string_metadata(tmp_path):
    dest = tmp_path / "v.safetensors"
    dest.write_bytes(b"previous contents")
    with pytest.raises(ValueError, match="must map str to str"):
        save_vectors(_vs(metadata={"n": 3}), dest)
    assert dest.read_bytes() == b"previous contents"


def test_save_overwrites_atomically(tmp_path):
    dest = tmp_path / "v.safetensors"
    save_vectors(_vs(layers=(1,)), dest)
    save_vectors(_vs(layers=(2, 4)), dest)
    assert load_vectors(dest).layers == [2, 4]
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]


# --- llama.cpp control vectors --------------------------------------------------------------

def test_gguf_round_trip_bit_exact(tmp_path):
    vs = _vs(model="SmolLM2-135M-Instruct", arch="llama", method="pca", metadata={"concept": "calm"})
    export_control_vector(vs, tmp_path / "v.gguf")
    _same(import_control_vector(tmp_path / "v.gguf", expect_hidden_size=H), vs)


def test_gguf_layout_matches_llama_cpp(tmp_path):
    vs = _vs(layers=(1, 5), method="pca")
    export_control_vector(vs, tmp_path / "v.gguf", model_hint="llama")
    r = gguf.GGUFReader(tmp_path / "v.gguf")
    assert r.fields["general.architecture"].contents() == "controlvector"
    assert r.fields["controlvector.model_hint"].contents() == "llama"
    assert r.fields["controlvector.layer_count"].types == [gguf.GGUFValueType.UINT32]
    assert r.fields["controlvector.layer_count"].contents() == 2
    assert [t.name for t in r.tensors] == ["direction.1", "direction.5"]
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and t.shape.tolist() == [H]
    # direction.N is layer N's output: the same index, no shift.
    assert np.array_equal(r.tensors[1].data, vs[5].numpy())


def test_model_hint_is_the_architecture_not_the_model(tmp_path):
    export_control_vector(_vs(model="/home/me/models/SmolLM2-135M-Instruct", arch="llama"), tmp_path / "a.gguf")
    assert gguf.GGUFReader(tmp_path / "a.gguf").fields["controlvector.model_hint"].contents() == "llama"
    back = import_control_vector(tmp_path / "a.gguf")
    assert (back.arch, back.model) == ("llama", "/home/me/models/SmolLM2-135M-Instruct")
    export_control_vector(_vs(arch="llama"), tmp_path / "b.gguf", model_hint="qwen2")
    assert import_control_vector(tmp_path / "b.gguf").arch == "qwen2"


@pytest.mark.parametrize("model_type, arch", [("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2"),
                                              ("qwen3", "qwen3"), ("phi3", "phi3"), ("gemma2", "gemma2"),
                                              ("gemma3_text", "gemma3")])
def test_gguf_arch_is_llama_cpps_name(model_type, arch):
    assert gguf_arch(model_type) == arch
    assert arch in gguf.MODEL_ARCH_NAMES.values()  # a name llama.cpp's own GGUF files carry


@pytest.mark.parametrize("hint", ["llama", "qwen2", "/some/local/dir", "anything at all"])
def test_import_reads_any_model_hint(tmp_path, hint):
    path = _gguf(tmp_path / "cv.gguf", {"direction.1": _vec()}, hint=hint)
    assert import_control_vector(path).arch == hint


def test_import_llama_cpp_written_file(tmp_path):
    path = _gguf(tmp_path / "cv.gguf", {"direction.3": _vec(), "direction.12": -_vec()})
    vs = import_control_vector(path)
    assert vs.site == "out" and vs.layers == [3, 12] and vs.arch == "llama" and vs.model is None
    assert vs.method is None and vs.metadata == {}
    assert torch.equal(vs[3], torch.arange(H, dtype=torch.float32))


def test_to_out_site():
    vs = _vs(layers=(2, 5), site="in", model="m", arch="qwen2", method="x", metadata={"a": "b"})
    out = to_out_site(vs)
    assert out.site == "out" and out.layers == [1, 4]
    assert torch.equal(out[1], vs[2]) and torch.equal(out[4], vs[5])
    assert (out.model, out.arch, out.method, out.metadata) == ("m", "qwen2", "x", {"a": "b"})
    same = _vs()
    assert to_out_site(same) is same
    with pytest.raises(ValueError, match="layer 0"):
        to_out_site(_vs(layers=(0, 3), site="in"))
    with pytest.raises(ValueError, match="only sites 'out' and 'in'"):
        to_out_site(_vs(site="attn"))


@pytest.mark.parametrize("vs, match", [
    (_vs(site="in"), "to_out_site"),
    (_vs(site="mlp"), "site 'mlp'"),
    (_vs(layers=(0, 1)), "direction.0"),
    (_vs(metadata={"n": 1}, arch="llama"), "must map str to str"),
    (_vs(model="m"), "has no arch"),
])
def test_export_refuses_before_writing(tmp_path, vs, match):
    dest = tmp_path / "v.gguf"
    dest.write_bytes(b"previous contents")
    with pytest.raises(ValueError, match=match):
        export_control_vector(vs, dest)
    assert dest.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["v.gguf"]


def test_failed_export_leaves_destination_untouched(tmp_path, monkeypatch):
    dest = tmp_path / "v.gguf"
    dest.write_bytes(b"previous contents")

    def broken(self, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_control_vector(_vs(arch="llama"), dest)
    assert dest.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["v.gguf"]


@pytest.mark.parametrize("tensors, arch, match", [
    ({"direction.1": _vec()}, "llama", "general.architecture is 'llama'"),
    ({"direction.0": _vec(), "direction.1": _vec()}, "controlvector", "direction.0 is invalid"),
    ({"direction.1": _vec().astype(np.float16)}, "controlvector", "F16 .* expected 1-D F32"),
    ({"direction.1": _vec(2 * H).reshape(2, H)}, "controlvector", "expected 1-D F32"),
    ({"direction.1": _vec(), "direction.2": _vec(H + 1)}, "controlvector", "size 17, expected 16"),
    ({"direction.1": np.full(H, np.nan, np.float32)}, "controlvector", "NaN or inf"),
    ({"direction.1": np.full(H, -np.inf, np.float32)}, "controlvector", "NaN or inf"),
    ({"blk.1.attn_q.weight": _vec()}, "controlvector", "not named direction.<layer>"),
    ({"direction.x": _vec()}, "controlvector", "not named direction.<layer>"),
    ({"direction.-1": _vec()}, "controlvector", "not named direction.<layer>"),
    ({}, "controlvector", "no direction tensors"),
])
def test_import_rejects_bad_content(tmp_path, tensors, arch, match):
    path = _gguf(tmp_path / "bad.gguf", tensors, arch=arch)
    with pytest.raises(ValueError, match=match) as e:
        import_control_vector(path)
    assert str(path) in str(e.value)


def test_import_expect_hidden_size(tmp_path):
    path = _gguf(tmp_path / "cv.gguf", {"direction.1": _vec()})
    with pytest.raises(ValueError, match="size 16, expected 576"):
        import_control_vector(path, expect_hidden_size=576)


@pytest.mark.parametrize("cut", [b"", b"GGUF and then nonsense", "half", "minus_four"])
def test_import_rejects_malformed_and_truncated(tmp_path, cut):
    good = tmp_path / "v.gguf"
    export_control_vector(_vs(arch="llama"), good)
    data = good.read_bytes()
    body = {"half": data[: len(data) // 2], "minus_four": data[:-4]}.get(cut, cut)
    (tmp_path / "bad.gguf").write_bytes(body)
    with pytest.raises(ValueError, match="bad.gguf is not a valid GGUF file"):
        import_control_vector(tmp_path / "bad.gguf")


def test_import_safetensors_file_is_rejected(tmp_path):
    save_vectors(_vs(), tmp_path / "v.safetensors")
    with pytest.raises(ValueError, match="not a valid GGUF file"):
        import_control_vector(tmp_path / "v.safetensors")


def test_import_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no control vector file"):
        import_control_vector(tmp_path / "missing.gguf")


def test_safetensors_to_gguf_and_back(tmp_path):
    vs = _vs(layers=(4, 6), site="in", model="m", arch="qwen2", method="x", metadata={"k": "v"})
    save_vectors(vs, tmp_path / "v.safetensors")
    loaded = load_vectors(tmp_path / "v.safetensors")
    export_control_vector(to_out_site(loaded), tmp_path / "v.gguf")
    _same(import_control_vector(tmp_path / "v.gguf"), to_out_site(vs))
