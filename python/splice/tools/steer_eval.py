"""What steering does to generated text, measured AxBench-style: concept, fluency, relevance.

Every measurement is made with the *unsteered* model (the patch is only on while generating):

* **Concept score.** A logistic-regression probe — *a linear probe trained on separate labelled
  text, not a judge model* — reads the unsteered model's hidden state at site ``in`` of
  ``probe_layer`` (default 15), averaged over the text's tokens but the first (the attention
  sink, as :func:`splice.steering.gates.pool` does). Features are standardised with
  the training split's mean and standard deviation; the probe minimises
  ``mean BCE(w·x + b, y) + l2/2 · |w|²`` (LBFGS, CPU) on a stratified 75% of the concept set's
  ``positive`` (y = 1) and ``negative`` (y = 0) texts and reports its accuracy on the other 25%.
  A generation's concept score is ``sigmoid(w·x + b)`` of the generated text alone (decoded
  without special tokens and re-tokenised, no prompt); an empty response has no score and is
  left out of the means (counted as ``empty``).
* **Fluency.** Perplexity of the response tokens given the chat-templated instruction,
  ``exp(Σ NLL / Σ tokens)`` pooled over the responses' tokens (the first end-of-sequence token
  counts; what follows it does not), and the repetition rate ``1 − distinct 3-grams / 3-grams``
  of each response's tokens (end-of-sequence left out; fewer than 3 tokens: 0), averaged over
  responses. A degenerate, repetitive response can have a *low* perplexity: read both.
* **Relevance.** Pointwise mutual information of the response with its instruction,
  ``Σ_t [log p(r_t | x_i, r_<t) − log p(r_t | x_j, r_<t)] / Σ tokens`` with ``x_j`` the next
  instruction of the same list (rotated by one). Positive: the response is specific to its
  instruction; 0: it would be as likely after any other.
* **Divergence.** ``KL(p_unsteered ‖ p_method)`` of the next-token distributions at each response
  token (the method's own distributions from its generation, the unsteered one teacher-forced on
  the same tokens), pooled over the response tokens. The unsteered run's own value is the
  numerical floor (cached decode against one full forward).

A *method* is a name and ``build(context) -> (scale -> [interventions])``, built once from the
concept data (:func:`method` adds one), and a scale grid: a steering vector's ``scales`` (its
coefficient), or, for a learned map (``lineas``, ``loreft``), ``map_scales`` (t in ``u + t·Δ(u)``,
1 the map as trained). For each method and scale the model generates greedily,
left-padded, in one batch, from the chat-templated held-out instructions; scale 0 is the
unsteered model's generation, computed once and shared by every method. A method whose
interventions carry a prefill decider (a :class:`~splice.steering.gates.Condition`) is also run on
held-out condition prompts and gets the gate's TPR and FPR, its concept scores on the prompts that
meet and do not meet the condition, and its KL on those that do not (CAST's promise: unchanged).

``concept at equal fluency``: the best mean concept score among the scales whose perplexity is at
most ``fluency_budget`` × the unsteered perplexity, so methods are compared at equal fluency.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..patch import patch
from ..runtime.token_state import prompt_token_mask
from ..steering.gates import RowDecider, pool
from ..steering.spec import Steer
from ..vectors.extract import builtin_pairs, extract_vectors
from ..vectors.prompt_sets import as_chat, builtin_prompt_set, load_prompt_set, require
from .condition_fit import fit_condition
from .controller_training import train_controller
from .gact import fit_gact
from .lineas import train_lineas

DEFAULT_SCALES = (0.0, 0.2, 0.4, 0.6, 0.8)
DEFAULT_MAP_SCALES = (0.5, 1.0, 1.5, 2.0)
STEER_LAYERS = tuple(range(12, 19))
CONDITION_LAYERS = tuple(range(1, 12))


# --- the concept probe ---------------------------------------------------------------------------
@dataclass
class Probe:
    """A logistic-regression probe on standardised features (module docstring)."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: float
    train_accuracy: float
    test_accuracy: float
    n_train: int
    n_test: int
    l2: float

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return ((features.float() - self.mean) / self.std) @ self.weight + self.bias

    def probability(self, features: torch.Tensor) -> torch.Tensor:
        """[N] probability of the positive class for features [N, H]."""
        return torch.sigmoid(self.logits(features))

    def summary(self) -> dict:
        return {"train_accuracy": self.train_accuracy, "test_accuracy": self.test_accuracy, "n_train": self.n_train,
                "n_test": self.n_test, "l2": self.l2}


def stratified_split(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) index tensors: each class shuffled with ``seed`` and cut at ``test_fraction``."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for value in (0, 1):
        idx = torch.nonzero(labels == value).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        cut = round(idx.numel() * test_fraction)
        test.append(idx[:cut])
        train.append(idx[cut:])
    return torch.cat(train), torch.cat(test)


def fit_probe(features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-2, test_fraction: float = 0.25,
              seed: int = 0, steps: int = 200) -> Probe:
    """Train a :class:`Probe` on a stratified ``1 − test_fraction`` of ``features`` [N, H] with
    ``labels`` [N] (0/1) and measure it on the rest."""
    features, labels = features.detach().float().cpu(), torch.as_tensor(labels).long().cpu()
    if features.dim() != 2 or features.shape[0] != labels.numel():
        raise ValueError(f"features must be [N, H] with N labels, got {tuple(features.shape)} and {labels.numel()}")
    counts = [int((labels == v).sum()) for v in (0, 1)]
    if min(counts) < 4 or counts[0] + counts[1] != labels.numel():
        raise ValueError(f"labels must be 0/1 with at least 4 of each class, got counts {counts}")
    train, test = stratified_split(labels, test_fraction, seed)
    x, y = features[train], labels[train].float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    probe = Probe(mean, std, w.detach(), float(b.detach()), 0.0, 0.0, train.numel(), test.numel(), l2)

    def accuracy(idx):
        if not idx.numel():
            return math.nan
        return float(((probe.logits(features[idx]) > 0).long() == labels[idx]).float().mean())

    probe.train_accuracy, probe.test_accuracy = accuracy(train), accuracy(test)
    return probe


def hidden_at(model, tokenizer, texts: Sequence[str], layer: int, batch_size: int = 8,
              add_special_tokens: bool = True):
    """Yield ``(hidden [B, S, H], prompt mask [B, S])`` per batch of ``texts``: the unsteered model's input
    of ``layer``, left-padded, with position ids counting real tokens (as a prefill sees it)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                enc = tokenizer(list(texts[start:start + batch_size]), padding=True, return_tensors="pt",
                                add_special_tokens=add_special_tokens)
                ids, attention = enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)
                positions = (attention.long().cumsum(1) - 1).clamp(min=0)
                hidden = model(input_ids=ids, attention_mask=attention, position_ids=positions,
                               output_hidden_states=True, use_cache=False, logits_to_keep=1).hidden_states[layer]
                yield hidden.float(), prompt_token_mask(attention.sum(1), ids.shape[1])
    finally:
        tokenizer.padding_side = side


def text_features(model, tokenizer, texts: Sequence[str], layer: int) -> torch.Tensor:
    """[N, H] the unsteered model's input of ``layer``, averaged over each text's tokens but the first
    (:func:`splice.steering.gates.pool`: the first token is the attention sink, many times the others'
    norm, and would make the features a function of the text's length)."""
    return torch.cat([pool(h, m, "mean").cpu() for h, m in hidden_at(model, tokenizer, texts, layer)])


def concept_probe(model, tokenizer, positive: Sequence[str], negative: Sequence[str], layer: int = 15,
                  l2: float = 1e-2, seed: int = 0) -> Probe:
    """The concept probe on the model's own features of ``positive`` and ``negative`` texts."""
    features = text_features(model, tokenizer, [*positive, *negative], layer)
    labels = torch.tensor([1] * len(positive) + [0] * len(negative))
    return fit_probe(features, labels, l2=l2, seed=seed)


def concept_scores(model, tokenizer, probe: Probe, texts: Sequence[str], layer: int) -> list[float | None]:
    """The probe's probability on each text (None for a text with nothing but whitespace)."""
    keep = [i for i, t in enumerate(texts) if t.strip()]
    scores: list[float | None] = [None] * len(texts)
    if keep:
        p = probe.probability(text_features(model, tokenizer, [texts[i] for i in keep], layer))
        for i, value in zip(keep, p.tolist()):
            scores[i] = value
    return scores


# --- fluency and relevance on token sequences ---------------------------------------------------
def repetition_rate(tokens: Sequence[int], n: int = 3) -> float:
    """``1 − distinct n-grams / n-grams`` of ``tokens`` (0 when there is no n-gram)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def response_tokens(generated: Sequence[int], eos_ids: set[int]) -> list[int]:
    """The generated tokens up to and including the first end-of-sequence token."""
    out = []
    for t in generated:
        out.append(int(t))
        if int(t) in eos_ids:
            break
    return out


@torch.inference_mode()
def response_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      responses: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced next-token log-probabilities at each response token: ``([B, T, V], mask [B, T])``.

    Row ``i`` is the left-padded prompt ``prompt_ids[i]`` followed by ``responses[i]`` (right-padded to
    the longest, ``T``); position ids count real tokens only, so padding changes nothing.
    """
    device = prompt_ids.device
    length = max(1, max(len(r) for r in responses))
    resp = torch.full((len(responses), length), pad_id, dtype=torch.long)
    resp_mask = torch.zeros(len(responses), length, dtype=prompt_mask.dtype)
    for i, r in enumerate(responses):
        resp[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        resp_mask[i, :len(r)] = 1
    ids = torch.cat([prompt_ids, resp.to(device)], 1)
    mask = torch.cat([prompt_mask, resp_mask.to(device)], 1)
    position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                   logits_to_keep=length + 1).logits[:, :-1]
    return F.log_softmax(logits.float(), dim=-1).cpu(), resp_mask.bool()


def token_logprobs(logprobs: torch.Tensor, responses: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Per row, the log-probability of each of its response tokens from ``logprobs`` [B, T, V]."""
    return [logprobs[i, torch.arange(len(r)), torch.tensor(list(r), dtype=torch.long)] if r else torch.zeros(0)
            for i, r in enumerate(responses)]


def pmi_relevance(own: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> float:
    """``Σ (log p(r_t | own instruction) − log p(r_t | other instruction)) / Σ tokens`` over rows of
    per-token log-probabilities (0 when there is no token)."""
    tokens = sum(len(o) for o in own)
    return float(sum(float((o - x).sum()) for o, x in zip(own, other))) / tokens if tokens else 0.0


def kl_per_token(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``KL(reference ‖ other)`` [...] of log-probability tensors [..., V]."""
    return (reference.exp() * (reference - other)).sum(-1)


def equal_fluency(runs: Sequence[dict], base_perplexity: float, budget: float) -> dict | None:
    """The run with the best concept score among ``runs`` (dicts with scale, concept, perplexity) whose
    perplexity is at most ``budget × base_perplexity`` (ties: the smaller scale); None if none fits."""
    limit = budget * base_perplexity
    fit = [r for r in runs if r["concept"] is not None and r["perplexity"] <= limit]
    if not fit:
        return None
    best = max(fit, key=lambda r: (r["concept"], -r["scale"]))
    return {"scale": best["scale"], "concept": best["concept"], "perplexity": best["perplexity"],
            "perplexity_limit": limit}


# --- generation ---------------------------------------------------------------------------------
@dataclass
class Generation:
    """A batch of greedy generations: the encoded prompts, each row's response tokens and text, and the
    generating model's next-token log-probabilities at each response token ([B, T, V])."""

    prompts: list[str]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    responses: list[list[int]]
    texts: list[str]
    logprobs: torch.Tensor
    decisions: list[bool] | None = None  # a patched run's prefill decisions, where it had a decider


def encode(tokenizer, prompts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    if tokenizer.padding_side != "left":
        raise ValueError("generation needs a left-padding tokenizer (tokenizer.padding_side = 'left')")
    enc = tokenizer(list(prompts), padding=True, return_tensors="pt", add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, items: Sequence = ()) -> Generation:
    """Greedy generations from chat-formatted ``prompts`` in one left-padded batch, under
    ``splice.patch(model, *items)`` when ``items`` is not empty (the unpatched model otherwise)."""
    ids, mask = encode(tokenizer, prompts, model.device)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                  output_logits=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    decisions = None
    if items:
        with patch(model, *items) as p:
            out = model.generate(**kwargs)
            deciders = {id(g): g for g in (getattr(i, "gate", None) for i in items) if isinstance(g, RowDecider)}
            if deciders:
                gates = p.runtime.gates
                columns = [c for d in deciders.values() for c in range(gates.column(d), gates.column(d) + d.width)]
                decisions = (gates.row[:, columns] > 0.5).any(1).tolist()  # as decisions() reads them
    else:
        out = model.generate(**kwargs)
    stop = eos_ids(model, tokenizer)
    generated = out.sequences[:, ids.shape[1]:].cpu()
    responses = [response_tokens(row.tolist(), stop) for row in generated]
    texts = [tokenizer.decode([t for t in r if t not in stop], skip_special_tokens=True) for r in responses]
    logprobs = F.log_softmax(torch.stack(out.logits, 1).float(), dim=-1).cpu()
    return Generation(list(prompts), ids, mask, responses, texts, logprobs, decisions)


def score(model, tokenizer, probe: Probe, probe_layer: int, gen: Generation, batch_size: int = 8) -> dict:
    """Per-row and pooled measurements of ``gen`` under the unsteered (unpatched) model."""
    pad = tokenizer.pad_token_id
    rotated = gen.prompts[1:] + gen.prompts[:1]
    other_ids, other_mask = encode(tokenizer, rotated, model.device)
    own_lp, other_lp, kls = [], [], []
    for start in range(0, len(gen.responses), batch_size):
        rows = slice(start, start + batch_size)
        chunk = gen.responses[rows]
        lp, _ = response_logprobs(model, gen.prompt_ids[rows], gen.prompt_mask[rows], chunk, pad)
        olp, _ = response_logprobs(model, other_ids[rows], other_mask[rows], chunk, pad)
        own_lp += token_logprobs(lp, chunk)
        other_lp += token_logprobs(olp, chunk)
        steered = gen.logprobs[rows][:, :lp.shape[1]]
        kl = kl_per_token(lp[:, :steered.shape[1]], steered)
        kls += [kl[i, :len(r)] for i, r in enumerate(chunk)]
    stop = eos_ids(model, tokenizer)
    concepts = concept_scores(model, tokenizer, probe, gen.texts, probe_layer)
    rows = []
    for i, r in enumerate(gen.responses):
        n = len(r)
        rows.append({"text": gen.texts[i], "tokens": n, "concept": concepts[i],
                     "perplexity": math.exp(-float(own_lp[i].mean())) if n else None,
                     "repetition": repetition_rate([t for t in r if t not in stop]),
                     "relevance": float((own_lp[i] - other_lp[i]).mean()) if n else None,
                     "kl": float(kls[i].mean()) if n else None,
                     "nll_sum": -float(own_lp[i].sum()), "pmi_sum": float((own_lp[i] - other_lp[i]).sum()),
                     "kl_sum": float(kls[i].sum())})
        if gen.decisions is not None:
            rows[-1]["patched_decision"] = bool(gen.decisions[i])
    return {"rows": rows, **pool_rows(rows)}


def pool_rows(rows: Sequence[dict]) -> dict:
    """Means over ``rows``: concept and repetition per response; perplexity, relevance and KL per token."""
    tokens = sum(r["tokens"] for r in rows)
    concepts = [r["concept"] for r in rows if r["concept"] is not None]
    return {"n": len(rows), "empty": len(rows) - len(concepts), "tokens": tokens,
            "concept": sum(concepts) / len(concepts) if concepts else None,
            "perplexity": math.exp(sum(r["nll_sum"] for r in rows) / tokens) if tokens else None,
            "repetition": sum(r["repetition"] for r in rows) / len(rows) if rows else None,
            "relevance": sum(r["pmi_sum"] for r in rows) / tokens if tokens else None,
            "kl": sum(r["kl_sum"] for r in rows) / tokens if tokens else None}


# --- methods ------------------------------------------------------------------------------------
@dataclass
class Context:
    """What methods are built from: the model, the steering pairs and the condition prompts (a fixed
    first half of each list fits; the second half is held out), each computed once on demand."""

    model: object
    tokenizer: object
    pairs: tuple[list[str], list[str]]
    condition_set: dict
    progress: bool = False
    _vectors: dict = field(default_factory=dict, repr=False)
    _condition: tuple | None = field(default=None, repr=False)

    def vectors(self, method: str = "mean_diff"):
        if method not in self._vectors:
            self._vectors[method] = extract_vectors(self.model, self.tokenizer, *self.pairs, method=method,
                                                    layers=list(STEER_LAYERS), progress=self.progress)
        return self._vectors[method]

    def condition_split(self) -> dict[str, tuple[list[str], list[str]]]:
        """``{"positive": (fit, held_out), "negative": (fit, held_out)}`` of the chat-formatted prompts."""
        out = {}
        for key in ("positive", "negative"):
            prompts = as_chat(self.tokenizer, self.condition_set[key])
            half = len(prompts) // 2
            out[key] = (prompts[:half], prompts[half:])
        return out

    def condition(self):
        """``(Condition, fit report)`` fitted on the first halves (candidate layers 1..11)."""
        if self._condition is None:
            split = self.condition_split()
            self._condition = fit_condition(self.model, self.tokenizer, split["positive"][0], split["negative"][0],
                                            layers=list(CONDITION_LAYERS), progress=self.progress)
        return self._condition


Build = Callable[[Context], Callable[[float], list]]
METHODS: dict[str, Build] = {}
MAP_METHODS: set[str] = set()  # evaluated over map_scales


def method(name: str, build: Build, learned_map: bool = False) -> Build:
    """Register ``build(context) -> (scale -> [interventions])`` as method ``name``."""
    METHODS[name] = build
    if learned_map:
        MAP_METHODS.add(name)
    return build


def _steer(kind: str) -> Build:
    def build(ctx: Context):
        vectors = ctx.vectors(kind)
        return lambda scale: [Steer(vectors, layers=list(STEER_LAYERS), scale=scale)]
    return build


def _conditional(ctx: Context):
    vectors, (condition, _) = ctx.vectors("mean_diff"), ctx.condition()
    return lambda scale: [Steer(vectors, layers=list(STEER_LAYERS), scale=scale, gate=condition)]


def _lineas(form: str) -> Build:
    def build(ctx: Context):
        positive, negative = ctx.pairs
        learned, _ = train_lineas(ctx.model, ctx.tokenizer, negative, positive, layers=list(STEER_LAYERS), steps=60,
                                  form=form, rank=8, progress=ctx.progress)
        return lambda scale: [dataclasses.replace(learned, scale=scale)]
    return build


def _gact(ctx: Context):
    bank, _, _ = fit_gact(ctx.model, ctx.tokenizer, *ctx.pairs, clusters=2, layers=STEER_LAYERS,
                          probe_layers=CONDITION_LAYERS, progress=ctx.progress)
    return lambda scale: [Steer(s.vector, layers=s.layers, scale=scale, gate=s.gate, name=s.name) for s in bank]


def _controller(ctx: Context):
    """Trained to give the steer prompts (the condition set's fit half) the vector at scale 0.4 and
    the others nothing; evaluated at each scale as ``scale · s · w_l``."""
    split = ctx.condition_split()
    controller, _, _ = train_controller(ctx.model, ctx.tokenizer, split["positive"][0], split["negative"][0],
                                        ctx.vectors("mean_diff"), STEER_LAYERS, 0.4, read_layer=6, steps=30,
                                        progress=ctx.progress)
    vectors = ctx.vectors("mean_diff")
    return lambda scale: [Steer(vectors, layers=list(STEER_LAYERS), scale=scale, gate=controller)]


method("mean_diff", _steer("mean_diff"))
method("pca", _steer("pca"))
method("conditional", _conditional)
method("lineas", _lineas("affine"), learned_map=True)
method("loreft", _lineas("lowrank"), learned_map=True)
method("gact", _gact)
method("controller", _controller)


def deciders_of(items: Sequence) -> list[RowDecider]:
    seen = {id(g): g for g in (getattr(i, "gate", None) for i in items) if isinstance(g, RowDecider)}
    return list(seen.values())


def decisions(model, tokenizer, decider: RowDecider, prompts: Sequence[str]) -> list[bool]:
    """Whether ``decider`` steers each chat-formatted prompt: its own ``decide`` on the unsteered input
    of its layer, encoded as :func:`generate` encodes it (a patched prefill reads the same); a gate
    counts as open above 0.5 (a condition's is 0 or 1, a controller's a product of sigmoids)."""
    out = []
    for hidden, mask in hidden_at(model, tokenizer, prompts, decider.layer, add_special_tokens=False):
        out += (decider.decide(hidden, mask) > 0.5).any(1).tolist()
    return out


def load_concept(concept: str) -> dict:
    """A built-in prompt set name or a JSON file, with ``positive`` and ``negative`` lists."""
    data = load_prompt_set(concept) if concept.endswith(".json") else builtin_prompt_set(concept)
    require(data, "positive", "negative", source=concept)
    return data


# --- the harness --------------------------------------------------------------------------------
def evaluate(model, tokenizer, methods: Sequence[str] = ("mean_diff", "pca", "conditional"),
             scales: Sequence[float] = DEFAULT_SCALES, map_scales: Sequence[float] = DEFAULT_MAP_SCALES,
             instructions: int = 16, max_new_tokens: int = 32,
             concept: str = "happy_probe", fluency_budget: float = 1.5, probe_layer: int = 15,
             pairs: str = "happy_sad", condition_set: str = "cooking", condition_prompts: int | None = None,
             progress: bool = True) -> dict:
    """The report: the probe, the unsteered baseline, and per method its runs per scale, its concept
    at equal fluency and, for conditional methods, the gate's rates and effects (module docstring)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; registered: {sorted(METHODS)}")
    scales = sorted({float(s) for s in scales} | {0.0})
    map_scales = sorted({float(s) for s in map_scales} | {0.0})
    if any(not math.isfinite(s) for s in scales + map_scales):
        raise ValueError(f"scales must be finite, got {scales} and {map_scales}")
    grid = {name: map_scales if name in MAP_METHODS else scales for name in methods}
    if instructions < 1 or max_new_tokens < 1 or fluency_budget <= 0:
        raise ValueError("instructions and max_new_tokens must be positive, and so must fluency_budget")
    concept_set = load_concept(concept)
    all_instructions = builtin_prompt_set("instructions")["instructions"]
    if instructions > len(all_instructions):
        raise ValueError(f"only {len(all_instructions)} built-in instructions, asked for {instructions}")
    cond_data = builtin_prompt_set(condition_set)
    require(cond_data, "positive", "negative", source=condition_set)

    probe = concept_probe(model, tokenizer, concept_set["positive"], concept_set["negative"], probe_layer)
    ctx = Context(model, tokenizer, builtin_pairs(pairs), cond_data)
    prompts = as_chat(tokenizer, all_instructions[:instructions])
    measure = lambda gen: score(model, tokenizer, probe, probe_layer, gen)  # noqa: E731

    builds = {name: METHODS[name](ctx) for name in methods}
    items_at = {name: build(1.0) for name, build in builds.items()}
    conditional = {name: deciders_of(items) for name, items in items_at.items() if deciders_of(items)}
    steps = sum(len(grid[m]) - 1 for m in methods) + 1 + sum(len(grid[m]) - 1 for m in conditional) + bool(conditional)
    bar = tqdm(total=steps, desc="eval steer", unit="run", disable=not progress)

    def run(label, batch, items=()):
        bar.set_postfix_str(label)
        result = measure(generate(model, tokenizer, batch, max_new_tokens, items))
        bar.update()
        return result

    base = run("unsteered", prompts)
    report = {"benchmark": "eval-steer", "model": getattr(model.config, "_name_or_path", None),
              "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
              "settings": {"methods": list(methods), "scales": scales, "map_scales": map_scales,
                           "map_methods": sorted(MAP_METHODS & set(methods)), "instructions": instructions,
                           "max_new_tokens": max_new_tokens, "concept": concept, "pairs": pairs,
                           "probe_layer": probe_layer, "probe_site": "in", "steer_layers": list(STEER_LAYERS),
                           "steer_site": "out", "fluency_budget": fluency_budget, "condition_set": condition_set},
              "probe": {"layer": probe_layer, "site": "in", **probe.summary()},
              "unsteered": base, "methods": {}}

    cond_eval = None
    if conditional:
        split = ctx.condition_split()
        held_pos = split["positive"][1][:condition_prompts] if condition_prompts else split["positive"][1]
        cond_base = run("unsteered, condition prompts", held_pos)
        cond_eval = {"prompts": held_pos, "negatives": split["negative"][1], "base": cond_base}

    for name in methods:
        runs = [{"scale": 0.0, **_without_rows(base)}]
        detail = {0.0: base}
        for scale in grid[name][1:]:
            detail[scale] = run(f"{name} {scale:g}", prompts, builds[name](scale))
            runs.append({"scale": scale, **_without_rows(detail[scale])})
        entry = {"runs": runs, "rows": {f"{s:g}": detail[s]["rows"] for s in grid[name]},
                 "equal_fluency": equal_fluency(runs, base["perplexity"], fluency_budget)}
        if name in conditional:
            entry["condition"] = _condition_report(model, tokenizer, name, conditional[name], ctx, cond_eval,
                                                   prompts, detail, grid[name], builds[name], run)
        report["methods"][name] = entry
    bar.close()
    return report


def _without_rows(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "rows"}


def _condition_report(model, tokenizer, name, deciders, ctx, cond_eval, prompts, detail, scales, build, run) -> dict:
    """Gate rates, concept on met / not met prompts and KL on not-met prompts, per scale (the first
    decider of the method decides; rows are the instructions' and then the condition prompts')."""
    decider = deciders[0]
    pos, neg = cond_eval["prompts"], cond_eval["negatives"]
    met_pos = decisions(model, tokenizer, decider, pos)
    met_instr = decisions(model, tokenizer, decider, prompts)
    met_neg = decisions(model, tokenizer, decider, neg)
    rate = lambda xs: sum(xs) / len(xs)  # noqa: E731
    fitted = ctx._condition is not None and decider is ctx._condition[0]
    out = {"layer": decider.layer, "settings": decider.settings() if hasattr(decider, "settings") else {},
           "fit": ctx._condition[1] if fitted else None, "tpr": rate(met_pos), "fpr_instructions": rate(met_instr),
           "fpr_condition_negatives": rate(met_neg), "n_condition_prompts": len(pos),
           "n_condition_negatives": len(neg), "n_instructions": len(prompts),
           "met_instructions": met_instr, "met_condition_prompts": met_pos, "runs": [], "rows": {}}
    met = met_instr + met_pos
    mismatches = 0
    for scale in scales:
        cond = cond_eval["base"] if scale == 0 else run(f"{name} {scale:g}, condition prompts", pos, build(scale))
        rows = detail[scale]["rows"] + cond["rows"]
        mismatches += sum(int(r["patched_decision"] != m) for r, m in zip(rows, met) if "patched_decision" in r)
        out["rows"][f"{scale:g}"] = cond["rows"]
        met_rows = [r for r, m in zip(rows, met) if m]
        not_met = [r for r, m in zip(rows, met) if not m]
        out["runs"].append({"scale": scale, "condition_prompts": _without_rows(cond),
                            "met": pool_rows(met_rows) if met_rows else None,
                            "not_met": pool_rows(not_met) if not_met else None})
    out["decision_mismatches"] = mismatches  # activation-based vs the patched run's own prefill decision
    return out
