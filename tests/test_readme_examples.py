"""The README's examples, run as written on the real model: each must run and give a sensible result.

The Python blocks run in README order in one namespace, as a reader pasting them into one session
would, in a temporary working directory that links ``docs/`` (the examples' relative paths). Besides
them, the ``splice extract`` commands of "Vector files" and the recipe of "Recipes" run.

Not run, and why:
- a Python block marked in the README by ``<!-- not-run: reason -->`` on the line before it;
- the client block of "Serving behind vLLM" (:data:`NOT_RUN_HERE`): it needs a running vLLM server,
  and tests/test_serving_vllm.py serves and queries one;
- the other shell blocks (installing, benchmarks, profiling, quantizing: minutes each) and the
  skip/routing recipe (it names a router file that only ``splice route train`` writes).
``test_every_python_block_is_run_or_marked`` fails on any Python block that is neither run here nor
marked, so nothing is skipped silently.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# The sections whose Python block a test below runs.
RUN = ("Python API", "Per-request steering", "Conditional steering (CAST)",
       "Learned maps and head edits (LinEAS, LoReFT's form, PH3)", "Layer skipping",
       "Speculative decoding: layer-skip drafts and prompt lookup", "Hybrid attention",
       "GemFilter: early layers choose the prompt",
       "Layer Fused Decoding (LFD): a middle layer's reading added to the logits",
       "LayerBoost: per-layer attention policies", "HyLRA: layers that reuse the tokens a full layer chose",
       "Decode attention", "Compiled decoding", "Mixed-precision quantization", "GPTQ: calibrated quantization")
NOT_RUN_HERE = {"Serving behind vLLM": "needs a running vLLM server; tests/test_serving_vllm.py runs one"}


@dataclass
class Block:
    section: str
    lang: str
    code: str
    not_run: str | None  # the README's reason, when marked


def readme_blocks(readme: Path = README) -> list[Block]:
    """Every fenced block of ``readme``, with the heading it sits under and its not-run mark."""
    blocks, section, mark, lang, code = [], "", None, "", None
    for line in readme.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if code is not None:
            if text == "```":
                blocks.append(Block(section, lang, textwrap.dedent("\n".join(code)), mark))
                code, mark = None, None
            else:
                code.append(line)
        elif text.startswith("```"):
            lang, code = text[3:], []
        elif m := re.fullmatch(r"<!-- not-run: (.+?) -->", text):
            mark = m.group(1)
        elif m := re.fullmatch(r"#+ (.+)", text):
            section = m.group(1)
        elif text:
            mark = None  # a mark applies to the block right after it
    return blocks


def block(section: str, lang: str) -> Block:
    (found,) = [b for b in readme_blocks() if b.section == section and b.lang == lang and b.not_run is None]
    return found


def test_every_python_block_is_run_or_marked():
    python = [b for b in readme_blocks() if b.lang == "python"]
    unmarked = [b.section for b in python if b.not_run is None and b.section not in NOT_RUN_HERE]
    assert sorted(unmarked) == sorted(RUN), "a README Python block is neither run by this file nor marked not-run"
    assert all(len(b.not_run) > 10 for b in python if b.not_run is not None), "a not-run mark gives no reason"


def test_marks_apply_to_the_next_block_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("## A\n<!-- not-run: needs a server -->\n\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
                      "## B\n<!-- not-run: stale -->\ntext in between\n```python\nz = 3\n```\n")
    assert [(b.section, b.code, b.not_run) for b in readme_blocks(readme)] == [
        ("A", "x = 1", "needs a server"), ("A", "y = 2", None), ("B", "z = 3", None)]


# --- running them ----------------------------------------------------------------------------

def assert_sensible(tok, text: str, min_tokens: int = 8) -> None:
    """Not degenerate: enough tokens, mostly distinct, none dominating (a steering scale far too
    large makes the model repeat one token)."""
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) >= min_tokens, f"too short: {text!r}"
    top = Counter(ids).most_common(1)[0][1]
    assert len(set(ids)) >= len(ids) / 2 and top <= max(3, len(ids) / 4), f"degenerate text: {text!r}"


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The README reader's session: one namespace, and the working directory the examples run in."""
    work = tmp_path_factory.mktemp("readme")
    (work / "docs").symlink_to(ROOT / "docs")
    return {"__name__": "readme_session"}, work


def run(session, section: str) -> str:
    """Run the section's Python block in the session; what it printed."""
    namespace, work = session
    code = block(section, "python").code
    out = io.StringIO()
    with contextlib.chdir(work), contextlib.redirect_stdout(out):
        exec(compile(code, f"README.md ({section})", "exec"), namespace)
    return out.getvalue()


def generate_text(model, tok, prompt: str, new: int, skip_special_tokens: bool = False) -> str:
    """The unpatched-call continuation of ``prompt``, greedy, as the README's examples decode it."""
    enc = tok([prompt], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=new, do_sample=False)
    return tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=skip_special_tokens)


@pytest.mark.real_model
def test_assert_sensible_refuses_repetition(real_model):
    _, tok = real_model
    assert_sensible(tok, " I spent the weekend hiking with friends and we cooked dinner by the lake.")
    for bad in (" happy" * 30, " joy! love!" * 10, " the weekend", "\n\n\n\n\n\n\n\n\n\n\n\n"):
        with pytest.raises(AssertionError):
            assert_sensible(tok, bad)


@pytest.mark.real_model
def test_python_api(session):
    printed = run(session, "Python API")
    model, tok = session[0]["model"], session[0]["tok"]
    text, backends = printed.rstrip("\n").rsplit("\n", 1)
    assert backends.startswith("{'fused_steer': ")
    prompt = "Tell me about your weekend."
    assert text.startswith(prompt)
    assert_sensible(tok, text[len(prompt):])
    # leaving the block restored the model: the same call gives the unsteered text, which differs
    assert prompt + generate_text(model, tok, prompt, 30) != text
    session[0]["_steered_weekend"] = text


@pytest.mark.real_model
def test_per_request_steering(session):
    run(session, "Per-request steering")
    ns = session[0]
    model, tok, out = ns["model"], ns["tok"], ns["out"]
    n = tok(["Hi!"], return_tensors="pt").input_ids.shape[1]
    rows = [tok.decode(row[n:], skip_special_tokens=True) for row in out]
    for row in rows:
        assert_sensible(tok, row)
    assert len(set(rows)) == 3, rows  # +happy, -happy and unsteered differ
    assert rows[2] == generate_text(model, tok, "Hi!", 20, skip_special_tokens=True)  # slot 0: unsteered


@pytest.mark.real_model
def test_vector_files_and_recipe(session):
    """The ``splice extract`` commands write the files; the recipe of "Recipes" steers with them
    exactly as the Python API example does."""
    from splice.cli import main

    namespace, work = session
    commands = [line.split("#")[0] for line in block("Vector files", "bash").code.splitlines()]
    with contextlib.chdir(work):
        for command in commands:
            argv = shlex.split(command)
            assert argv[0] == ".venv/bin/splice"
            assert main(argv[1:]) == 0
    hint = gguf.GGUFReader(work / "happy.gguf").fields["controlvector.model_hint"].contents()
    assert hint == "llama"
    (work / "recipe.yaml").write_text(block("Recipes", "yaml").code)
    model, tok = namespace["model"], namespace["tok"]
    import splice

    prompt = "Tell me about your weekend."
    with splice.patch(model, recipe=work / "recipe.yaml"):
        text = prompt + generate_text(model, tok, prompt, 30)
    assert text == namespace["_steered_weekend"]


@pytest.mark.real_model
def test_layer_skipping(session):
    printed = run(session, "Layer skipping")
    ns = session[0]
    model, tok, ids = ns["model"], ns["tok"], ns["ids"]
    text, acceptance = printed.rstrip("\n").rsplit(" ", 1)
    assert 0 < float(acceptance) <= 1
    assert "Paris" in text
    assert_sensible(tok, text, min_tokens=6)
    with torch.inference_mode():
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
    assert text == tok.decode(greedy[0, ids.shape[1]:])  # the full model's greedy answer


@pytest.mark.real_model
def test_speculative_decoding(session):
    printed = run(session, "Speculative decoding: layer-skip drafts and prompt lookup")
    ns = session[0]
    model, tok, ids, stats = ns["model"], ns["tok"], ns["summary_ids"], ns["lookup_stats"]
    summary, _ = printed.rstrip("\n").rsplit("\n", 1)
    assert "Shalott" in summary
    with torch.inference_mode():
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False)
    assert summary == tok.decode(greedy[0, ids.shape[1]:])  # the model's own greedy summary
    assert stats.looked_up > 0 and stats.accepted >= stats.new_tokens // 4


def test_int8_activations(session):
    """The int8-activation layer stays within a fraction of a percent of the float one, and says
    whether it used int8 dot products."""
    from splice.ops import library

    flag, err = run(session, "Mixed-precision quantization").split()
    assert flag == str(library.int8_dot_products()) and 1e-4 < float(err) < 0.05


def test_gptq_layer(session):
    """On correlated inputs GPTQ's output error is well below round-to-nearest's in the same format."""
    rtn, gptq = map(float, run(session, "GPTQ: calibrated quantization").split())
    assert 0 < gptq < 0.8 * rtn


@pytest.mark.real_model
def test_decode_attention(session):
    """The model had SDPA, gives the same tokens with splice's decode attention, and gets SDPA back."""
    assert run(session, "Decode attention").split() == ["sdpa", "True"]
    assert session[0]["model"].config._attn_implementation == "sdpa"


@pytest.mark.real_model
def test_compiled_decoding(session):
    """Compiled and eager generation of the steered model give the same tokens, and sensible text."""
    printed = run(session, "Compiled decoding")
    text, equal = printed.rstrip("\n").rsplit(" ", 1)
    assert equal == "True", printed
    assert_sensible(session[0]["tok"], text, min_tokens=6)


@pytest.mark.real_model
def test_hybrid_attention(session):
    printed = run(session, "Hybrid attention")
    answer, expected = printed.strip().split(" expected ")
    assert expected == session[0]["key"].answer
    assert answer.strip().startswith(expected), printed  # the key, read back from beyond the window


@pytest.mark.real_model
def test_layerboost_policy(session):
    """The searched policy costs perplexity on held-out text, and remove() gives the unpatched model back."""
    from splice.tools.calibration_text import perplexity

    printed = run(session, "LayerBoost: per-layer attention policies").split()
    ns = session[0]
    assert len(ns["policy"].choices) == 30 and ns["policy"].none_layers and ns["policy"].window_layers
    patched, unpatched = float(printed[-2]), float(printed[-1])
    assert unpatched == perplexity(ns["model"], ns["held_out"]) and 1.0 < patched / unpatched < 1.5, printed


@pytest.mark.real_model
def test_hylra_reuse(session):
    """Decoding under the searched reuse policy reads fewer tokens in 18 of 30 layers and stays within
    a few percent of the unpatched perplexity; remove() gives the unpatched model back."""
    from splice.tools.calibration_text import continuation_perplexity

    printed = run(session, "HyLRA: layers that reuse the tokens a full layer chose").split()
    ns = session[0]
    assert len(ns["policy"].full_layers) == 12 and ns["policy"].topk == 1024
    patched, unpatched = float(printed[-2]), float(printed[-1])
    assert unpatched == continuation_perplexity(ns["model"], ns["held_out"], prefix=1024)
    assert patched != unpatched and 0.98 < patched / unpatched < 1.1, printed


@pytest.mark.real_model
def test_gemfilter(session):
    """The key is read back from the 512 tokens GemFilter kept of the 2K prompt."""
    printed = run(session, "GemFilter: early layers choose the prompt")
    answer, expected = printed.strip().split(" expected ")
    assert expected == session[0]["key"].answer and session[0]["key"].ids.shape[1] > 1900
    assert answer.strip().startswith(expected), printed


@pytest.mark.real_model
def test_layer_fused_decoding(session):
    """Weight 0 gives plain generate's answer (the passage's); the fused settings change it."""
    printed = run(session, "Layer Fused Decoding (LFD): a middle layer's reading added to the logits")
    lines = printed.rstrip("\n").split("\n")
    namespace = session[0]
    model, tok, conflict = namespace["model"], namespace["tok"], namespace["conflict"]
    plain = generate_text(model, tok, conflict.prompt, 6)
    assert lines[0] == f"auto 0.0 {plain!r}" and plain.startswith(" " + conflict.context), printed
    assert len(lines) == 3 and all(line.split(" ", 2)[2] != repr(plain) for line in lines[1:]), printed


@pytest.mark.real_model
@pytest.mark.slow
def test_conditional_steering(session):
    """The fitted condition steers the cooking request and leaves the other exactly unsteered."""
    printed = run(session, "Conditional steering (CAST)").rstrip("\n").split("\n")
    ns = session[0]
    model, tok, enc, out = ns["model"], ns["tok"], ns["enc"], ns["out"]
    layer, f1 = printed[0].split()
    assert 1 <= int(layer) <= 11 and float(f1) > 0.8
    with torch.inference_mode():
        plain = model.generate(**enc, max_new_tokens=24, do_sample=False)
    n = enc.input_ids.shape[1]
    assert torch.equal(out[1], plain[1])  # does not meet the condition: the unsteered answer
    assert not torch.equal(out[0, n:], plain[0, n:])  # meets it: steered
    assert_sensible(tok, tok.decode(out[0, n:], skip_special_tokens=True))


@pytest.mark.real_model
@pytest.mark.slow
def test_learned_maps_and_head_edits(session):
    printed = run(session, "Learned maps and head edits (LinEAS, LoReFT's form, PH3)").rstrip("\n")
    losses, text = printed.split("\n", 1)
    first, last = map(float, losses.split())
    assert last < first
    prompt = "Tell me about your weekend."
    assert text.startswith(prompt)
    assert_sensible(tok := session[0]["tok"], text[len(prompt):])
    assert prompt + generate_text(session[0]["model"], tok, prompt, 20) != text  # the maps changed the answer
