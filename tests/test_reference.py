"""An independent float64 reference of the published equations, checked against every forward path.

The reference below reads only the modules' parameters (Linear / LayerNorm / Embedding weights) and
recomputes everything with plain tensor code: it never calls a block's, router's or model's forward.
Equations (arXiv 2605.05222, the published method; CALM and Mixture-of-Depths for the rest):

  (R)  p = sigmoid(W2 · ReLU(W1 · h + b1) + b2)                  router, on the raw state h
  (A)  h' = h + (1 - p) * Attn(LN1(h))                            attention update, keep weight 1 - p
  (F)  h'' = h' + (1 - p) * FFN(LN2(h'))                          FFN update, the same p
  (H)  hard mode: p > t skips the block (p == t runs); a skipped token's state is copied, and at that
       layer its key and value are projected from the copied state (CALM)
  (E)  early exit: a token leaves once max softmax of its exit head reaches t (confidence >= t)
  (M)  Mixture-of-Depths: training runs the top-k = max(1, round(capacity * T)) scores per sequence,
       update weighted by sigmoid(score); sampling runs a token when its predicted skip prob <= t
  (D)  distillation: KL(P_dense || Q_student) = sum_v P log(P / Q), averaged over tokens
"""

from __future__ import annotations

import copy
import math
from dataclasses import fields
from types import SimpleNamespace

import lightning
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import quiet_trainer
from tsa_lightning.accounting import dense_twin_flops, forward_flops
from tsa_lightning.baselines import build_model
from tsa_lightning.inference import generate_cached
from tsa_lightning.model import Block, TSAConfig
from tsa_lightning.module import TSALanguageModel

SHAPE = dict(vocab_size=16, block_size=16, n_layer=3, n_head=2, n_embd=16)
TOL = dict(rtol=1e-9, atol=1e-9)  # float64 against float64: far below any real difference


# ---------------------------------------------------------------- the reference, one equation each


def ref_linear(x, linear):
    """y = x W^T + b."""
    y = x @ linear.weight.T
    return y if linear.bias is None else y + linear.bias


def ref_layer_norm(x, norm):
    """LN(x) = (x - mean(x)) / sqrt(var(x) + 1e-5) * gamma + beta, biased variance over the channels."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight
    return y if norm.bias is None else y + norm.bias


def ref_router_logit(h, router):
    """(R) before the sigmoid: W2 · ReLU(W1 · h + b1) + b2, read from the raw state h (no LayerNorm);
    with a router slope s, ReLU(z) becomes z where z > 0, else s z."""
    z = ref_linear(h, router.hidden)
    return ref_linear(torch.where(z > 0, z, router.slope * z), router.out).squeeze(-1)


def ref_router(h, router):
    """(R) p = sigmoid(W2 · ReLU(W1 · h + b1) + b2): the probability that a token halts."""
    return torch.sigmoid(ref_router_logit(h, router))


def ref_attention(a, attn, n_head, is_key=None):
    """Causal multi-head attention softmax(Q K^T / sqrt(d)) V W_O of normalised states a (B, T, C).

    Keys and values of every position come from a; `is_key` (B, T) drops positions from the keys
    (a query always reads itself) - only to show that the tests can tell K/V choices apart.
    """
    B, T, C = a.shape
    D = C // n_head
    q = ref_linear(a, attn.query)
    k, v = ref_linear(a, attn.key_value).split(C, dim=-1)  # key_value's rows: [W_K; W_V]
    q, k, v = (t.view(B, T, n_head, D).transpose(1, 2) for t in (q, k, v))
    allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
    if is_key is not None:
        allowed = allowed & (is_key[:, None, :] | torch.eye(T, dtype=torch.bool))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~allowed[:, None], -math.inf)
    y = torch.softmax(scores, dim=-1) @ v
    return ref_linear(y.transpose(1, 2).reshape(B, T, C), attn.proj)


def ref_ffn(a, mlp):
    """FFN(a) = W2 GELU(W1 a + b1) + b2, GELU(x) = x/2 (1 + erf(x / sqrt 2)) (the exact one)."""
    z = ref_linear(a, mlp.fc)
    return ref_linear(0.5 * z * (1 + torch.erf(z / math.sqrt(2))), mlp.proj)


def ref_block(h, block, n_head, keep=None, run=None, skipped_are_keys=True):
    """(A) then (F) with keep = 1 - p (B, T) (None: 1); (H) tokens with run False are copied unchanged.

    Both updates use the same keep. Keys/values at this layer come from every position's input state
    - for a skipped token, its copied state.
    """
    keep = torch.ones(h.shape[:2], dtype=h.dtype) if keep is None else keep
    run = torch.ones(h.shape[:2], dtype=torch.bool) if run is None else run
    is_key = None if skipped_are_keys else run
    h1 = h + keep[..., None] * ref_attention(ref_layer_norm(h, block.ln_1), block.attn, n_head, is_key)
    h2 = h1 + keep[..., None] * ref_ffn(ref_layer_norm(h1, block.ln_2), block.mlp)
    return torch.where(run[..., None], h2, h)


def ref_logits(h, model):
    """The (tied) LM head: LN_f(h) W_E^T."""
    return ref_layer_norm(h, model.ln_f) @ model.wte.weight.T


@torch.no_grad()
def ref_forward(model, idx, decide, skipped_are_keys=True):
    """Embeddings, the stem (block 0, always run), then each block l >= 1 as `decide(l, h)` says.

    decide returns (keep (B, T) or None, run (B, T) bool or None, halt or None).

    Returns logits (B, T, V), run (B, T, L) and the halts (B, T, #decisions) where decide gave one.
    """
    T = idx.size(1)
    h = model.wte.weight[idx] + model.wpe.weight[:T]
    h = ref_block(h, model.blocks[0], model.config.n_head)
    runs, halts = [torch.ones(idx.shape, dtype=torch.bool)], []
    for l in range(1, model.config.n_layer):
        keep, run, halt = decide(l, h)
        h = ref_block(h, model.blocks[l], model.config.n_head, keep, run, skipped_are_keys)
        runs.append(torch.ones(idx.shape, dtype=torch.bool) if run is None else run)
        if halt is not None:
            halts.append(halt)
    return ref_logits(h, model), torch.stack(runs, -1), torch.stack(halts, -1) if halts else None


def dense_rule(model):
    """The dense twin: every block, unscaled."""
    return lambda l, h: (None, None, None)


def tsa_rule(model, threshold=None):
    """Soft (threshold None): keep = 1 - p (R), every token runs. Hard (H): a token runs iff p <= t."""

    def decide(l, h):
        p = ref_router(h, model.routers[l - 1])
        run = None if threshold is None else p <= threshold
        return 1 - p, run, p

    return decide


def unit_rule(model, threshold):
    """The unit gate in hard mode: a token runs iff p <= t, and then adds its whole update."""

    def decide(l, h):
        p = ref_router(h, model.routers[l - 1])
        return None, p <= threshold, p

    return decide


def early_exit_rule(model, threshold):
    """(E) CALM: the confidence is max softmax of the exit head LN_f(h) W_E^T; once >= t a token has left
    for good (it is remembered here, not re-decided), its updates unscaled."""
    left = None

    def decide(l, h):
        nonlocal left
        confidence = torch.softmax(ref_logits(h, model), dim=-1).amax(-1)
        left = confidence >= threshold if left is None else left | (confidence >= threshold)
        return None, ~left, confidence

    return decide


def mod_rule(model, threshold=None):
    """(M) every mod_every-th block: weight w = sigmoid(score(h)). Sampling (threshold given): a token runs
    iff the predictor's skip probability <= t. Training (None): the top k = max(1, round(c T)) w of each
    sequence run. Returns the predictor's skip probability as the halt."""

    def decide(l, h):
        if l % model.config.mod_every:
            return None, None, None
        w = torch.sigmoid(ref_linear(h, model.scorers[str(l - 1)])).squeeze(-1)
        skip = ref_router(h, model.predictors[str(l - 1)])
        if threshold is not None:
            return w, skip <= threshold, skip
        k = max(1, round(model.config.mod_capacity * h.size(1)))
        top = w.argsort(dim=-1, descending=True)[:, :k]
        return w, torch.zeros_like(w, dtype=torch.bool).scatter(1, top, True), skip

    return decide


def ref_kl(teacher_logits, student_logits):
    """(D) KL(P || Q) = sum_v P (log P - log Q), P the teacher's distribution, mean over tokens."""
    log_p = torch.log_softmax(teacher_logits.double(), -1).flatten(0, -2)
    log_q = torch.log_softmax(student_logits.double(), -1).flatten(0, -2)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


# ---------------------------------------------------------------- fixtures


def make(routing="tsa", seed=0, **overrides):
    """A tiny float64 model with large random weights, so that p, confidences and scores spread widely."""
    torch.manual_seed(seed)
    model = build_model(TSAConfig(**{**SHAPE, "routing": routing, **overrides}))
    scramble(model, seed)
    return model.double().eval()


def scramble(module, seed=0):
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if name.startswith(("wte", "wpe")):
                p.copy_(noise)
            elif p.dim() == 2:
                p.copy_(noise / math.sqrt(p.size(1)))
            elif "ln" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


def tokens(B=3, T=16, seed=1):
    return torch.randint(0, SHAPE["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def between(values, share=0.5):
    """A threshold with about `share` of the values below it, half-way between two of them."""
    v = values.flatten().unique()
    i = max(1, min(len(v) - 1, round(share * len(v))))
    assert v[i] - v[i - 1] > 1e-6, "values too close to split cleanly"
    return float((v[i] + v[i - 1]) / 2)


def assert_clear_of(values, threshold):
    """Guard: no value within rounding of the threshold, so float64 noise cannot flip a decision."""
    assert (values - threshold).abs().min() > 1e-8


def assert_mixed(run, blocks=None):
    """Guard: in every routed block (default: all after the stem) some tokens run and some skip."""
    share = run[..., blocks or slice(1, None)].float().mean(dim=(0, 1))
    assert ((share > 0) & (share < 1)).all(), share


def exact_tie_router(router):
    """p = sigmoid(relu(z0) - relu(z1)): exactly 0.5 (computed exactly anywhere) when both units are off."""
    with torch.no_grad():
        router.out.weight.zero_()
        router.out.weight[0, 0], router.out.weight[0, 1] = 1.0, -1.0
        router.out.bias.zero_()
        router.hidden.bias[:2] = -0.3  # about a third of the tokens have both units off


# ---------------------------------------------------------------- TSA: router, soft, hard, straight-through


@pytest.mark.parametrize("router_slope", [0.0, 0.05])
def test_router_is_the_published_mlp_on_the_raw_state(router_slope):
    model = make(router_slope=router_slope)
    idx = tokens()
    _, _, routing = model(idx, mode="soft")
    _, _, halts = ref_forward(model, idx, tsa_rule(model))
    torch.testing.assert_close(routing.halt_probs, halts, **TOL)
    router = model.routers[0]
    assert router.hidden.out_features == max(16, SHAPE["n_embd"] // 4) and router.out.out_features == 1
    assert router.slope == router_slope  # what the reference reads


@pytest.mark.parametrize("routing", ["none", "tsa"])
def test_soft_forward_is_the_papers_equations(routing):
    model = make(routing)
    idx = tokens()
    logits, _, r = model(idx, mode="soft")
    rule = dense_rule(model) if routing == "none" else tsa_rule(model)
    expected, _, _ = ref_forward(model, idx, rule)
    torch.testing.assert_close(logits, expected, **TOL)
    assert r.executed.all()


def test_hard_and_straight_through_forwards_match_the_reference_on_both_block_paths(monkeypatch):
    """Hard mode through the run-for-all path and the gathered path (run_for_all_above 0 and 1), and the
    straight-through gate's training forward, all equal one reference of (H)."""
    model = make()
    idx = tokens()
    t = between(ref_forward(model, idx, tsa_rule(model))[2])
    expected, run, halts = ref_forward(model, idx, tsa_rule(model, t))
    assert_clear_of(halts, t)
    assert_mixed(run)
    # the K/V choice matters here: dropping skipped tokens from the keys gives other logits
    other, _, _ = ref_forward(model, idx, tsa_rule(model, t), skipped_are_keys=False)
    assert (other - expected).abs().max() > 1e-3

    calls = []
    update = Block.update
    monkeypatch.setattr(Block, "update", lambda self, *a: calls.append(1) or update(self, *a))
    for run_for_all_above, updates in ((1.0, 1), (0.0, SHAPE["n_layer"])):  # gathered, then run for all
        for block in model.blocks:
            block.run_for_all_above = run_for_all_above
        calls.clear()
        logits, _, routing = model(idx, mode="hard", threshold=t)
        assert len(calls) == updates  # the stem, plus each routed block on the run-for-all path
        torch.testing.assert_close(logits, expected, **TOL)
        assert torch.equal(routing.executed, run)
        torch.testing.assert_close(routing.halt_probs, halts, **TOL)
        model.config.gate = "straight_through"
        logits, _, routing = model(idx, mode="soft", threshold=t)
        model.config.gate = "soft"
        torch.testing.assert_close(logits, expected, **TOL)
        assert routing.executed.all()  # training runs every block; skipped updates are scaled to 0


def test_a_token_whose_p_equals_the_threshold_runs_and_one_above_skips(monkeypatch):
    model = make()
    for router in model.routers:
        exact_tie_router(router)
    idx = tokens()
    t = 0.5
    expected, run, halts = ref_forward(model, idx, tsa_rule(model, t))
    for l in range(halts.size(-1)):  # every routed block sees ties, tokens above and tokens below
        assert (halts[..., l] == t).any() and (halts[..., l] > t).any() and (halts[..., l] < t).any()
    assert torch.equal(run[..., 1:], halts <= t)
    for run_for_all_above in (1.0, 0.0):
        for block in model.blocks:
            block.run_for_all_above = run_for_all_above
        logits, _, routing = model(idx, mode="hard", threshold=t)
        assert torch.equal(routing.halt_probs == t, halts == t)  # the ties are the model's too
        assert routing.executed[..., 1:][halts == t].all()  # p == t runs
        assert not routing.executed[..., 1:][halts > t].any()  # p > t skips
        torch.testing.assert_close(logits, expected, **TOL)
    assert torch.equal(model.hard_executed(torch.logit(halts), t), run)  # the accounting's rule is the same


# ---------------------------------------------------------------- cached decoding


def test_unit_gate_forwards_match_the_reference_on_both_block_paths_and_train_the_router():
    """Hard mode (run-for-all and gathered paths) and the unit gate's training forward equal one
    reference in which a kept token adds its whole update; the router still gets a gradient."""
    model = make(gate="unit")
    idx = tokens()
    t = between(ref_forward(model, idx, tsa_rule(model))[2])
    expected, run, halts = ref_forward(model, idx, unit_rule(model, t))
    assert_clear_of(halts, t)
    assert_mixed(run)
    scaled, _, _ = ref_forward(model, idx, tsa_rule(model, t))  # the (1 - p) gate differs here
    assert (scaled - expected).abs().max() > 1e-3
    for run_for_all_above in (1.0, 0.0):
        for block in model.blocks:
            block.run_for_all_above = run_for_all_above
        logits, _, routing = model(idx, mode="hard", threshold=t)
        torch.testing.assert_close(logits, expected, **TOL)
        assert torch.equal(routing.executed, run)
    model.train()
    logits, _, _ = model(idx, mode="soft", threshold=t)
    torch.testing.assert_close(logits, expected, **TOL)
    logits.square().mean().backward()
    assert all(r.out.weight.grad.abs().sum() > 0 for r in model.routers)  # straight-through: 1 - p


def test_unit_gate_at_budget_one_is_the_network_without_routers_and_costs_the_routers_more():
    model = make(gate="unit")
    dense = make("none")
    dense.load_state_dict(model.state_dict(), strict=False)
    idx = tokens()
    logits, _, routing = model(idx, mode="hard", threshold=1.0)
    assert torch.equal(logits, dense(idx)[0]) and routing.executed.all()
    expected = ref_forward(dense, idx, dense_rule(dense))[0]
    torch.testing.assert_close(logits, expected, **TOL)
    B, T = idx.shape
    routers = B * T * (SHAPE["n_layer"] - 1) * 2 * model.config.router_hidden * (SHAPE["n_embd"] + 1)
    assert forward_flops(model.config, routing.executed) == dense_twin_flops(model.config, B, T) + routers


@pytest.mark.parametrize("routing", ["tsa", "unit", "early_exit", "mod"])
def test_cached_decoding_token_by_token_equals_full_recomputation(routing):
    """A prompt prefilled into the KV cache, then one token per step (what inference.py does); each step's
    logits and skips equal the reference recomputed from scratch over the whole prefix."""
    model = make("tsa", gate="unit") if routing == "unit" else make(routing)
    idx = tokens(B=3, T=14, seed=4)
    rule = {"tsa": tsa_rule, "unit": unit_rule, "early_exit": early_exit_rule, "mod": mod_rule}[routing]
    halts = ref_forward(model, idx, rule(model, 2.0))[2]  # t = 2: nobody skips; the values to split
    t = between(halts)
    _, run, halts = ref_forward(model, idx, rule(model, t))
    assert_clear_of(halts, t)
    assert_mixed(run, [2] if routing == "mod" else None)
    P = 5
    model.set_kv_cache(idx.size(0), SHAPE["block_size"])
    try:
        logits, _, routing_info = model(idx[:, :P], mode="hard", threshold=t, input_pos=0)
        expected, expected_run, _ = ref_forward(model, idx[:, :P], rule(model, t))
        torch.testing.assert_close(logits, expected, **TOL)
        assert torch.equal(routing_info.executed, expected_run)
        step_runs = []
        for pos in range(P, idx.size(1)):
            logits, _, routing_info = model(idx[:, pos : pos + 1], mode="hard", threshold=t, input_pos=pos)
            expected, expected_run, _ = ref_forward(model, idx[:, : pos + 1], rule(model, t))
            torch.testing.assert_close(logits[:, 0], expected[:, -1], **TOL)
            assert torch.equal(routing_info.executed[:, 0], expected_run[:, -1])
            step_runs.append(routing_info.executed[:, 0])
    finally:
        model.clear_kv_cache()
    steps = torch.stack(step_runs, 1)  # (B, steps, L)
    assert not steps[..., 1:].all() and steps[..., 1:].any()  # decoding steps skipped some blocks
    assert not (torch.equal(steps[0], steps[1]) and torch.equal(steps[1], steps[2]))  # rows differ


def ref_greedy(model, prompt, n, rule):
    """Greedy sampling by full recomputation of the reference; also the run mask of the whole sample."""
    seq = prompt.clone()
    for _ in range(n):
        logits = ref_forward(model, seq[None], rule())[0][0, -1]
        top2 = logits.topk(2).values
        assert top2[0] - top2[1] > 1e-6  # no near tie: argmax is well defined
        seq = torch.cat([seq, logits.argmax()[None]])
    return seq, ref_forward(model, seq[None], rule())[1][0]


def test_batched_decoding_rows_that_skip_differently_each_equal_decoding_alone():
    model = make(seed=3)
    prompts = [tokens(1, n, seed=10 + n)[0] for n in (3, 8, 5)]  # left-padded to 8 in the batch
    t = between(ref_forward(model, tokens(4, 16, seed=5), tsa_rule(model))[2])
    n = 7
    batched = generate_cached(model, prompts, n, temperature=0.0, threshold=t, mode="hard")
    masks = []
    for prompt, row in zip(prompts, batched, strict=True):
        alone = generate_cached(model, [prompt], n, temperature=0.0, threshold=t, mode="hard")[0]
        expected, run = ref_greedy(model, prompt, n, lambda: tsa_rule(model, t))
        assert torch.equal(row, alone) and torch.equal(row, expected)
        _, _, halts = ref_forward(model, expected[None], tsa_rule(model, t))
        assert_clear_of(halts, t)
        masks.append(run[-n:])  # which blocks each sampled position ran
    assert any(m[..., 1:].any() and not m[..., 1:].all() for m in masks)
    assert not (torch.equal(masks[0], masks[1]) and torch.equal(masks[1], masks[2]))


# ---------------------------------------------------------------- early exit


def test_early_exit_matches_the_reference_and_trains_on_the_mean_of_all_exits():
    model = make("early_exit")
    idx = tokens()
    t = between(ref_forward(model, idx, early_exit_rule(model, 2.0))[2], share=0.4)
    expected, run, confidence = ref_forward(model, idx, early_exit_rule(model, t))
    assert_clear_of(confidence, t)
    assert_mixed(run)
    assert (run[..., 1] & ~run[..., 2]).any()  # some tokens leave after block 1, not only after the stem
    logits, _, routing = model(idx, mode="hard", threshold=t)
    torch.testing.assert_close(logits, expected, **TOL)
    assert torch.equal(routing.executed, run)
    # training (soft mode): every block runs; loss + aux is the mean cross-entropy of the L exits
    _, loss, routing = model(idx, targets=idx, mode="soft")
    h = ref_block(model.wte.weight[idx] + model.wpe.weight[: idx.size(1)], model.blocks[0], SHAPE["n_head"])
    exits = [F.cross_entropy(ref_logits(h, model).flatten(0, 1), idx.flatten())]
    for block in model.blocks[1:]:
        h = ref_block(h, block, SHAPE["n_head"])
        exits.append(F.cross_entropy(ref_logits(h, model).flatten(0, 1), idx.flatten()))
    torch.testing.assert_close(loss, exits[-1], **TOL)
    torch.testing.assert_close(loss + routing.aux_loss, torch.stack(exits).mean(), **TOL)


def test_early_exit_leaves_when_confidence_equals_the_threshold():
    """With LN_f's gain and bias zero every exit head gives uniform logits: confidence exactly 1/V."""
    model = make("early_exit")
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.zero_()
    idx = tokens()
    t = 1 / SHAPE["vocab_size"]  # 1/16: exact
    routing_at = model(idx, mode="hard", threshold=t)[2]
    routing_above = model(idx, mode="hard", threshold=math.nextafter(t, 1.0))[2]
    assert torch.equal(routing_at.halt_probs, torch.full_like(routing_at.halt_probs, t))
    assert not routing_at.executed[..., 1:].any()  # confidence == t: every token leaves after the stem
    assert routing_above.executed.all()  # just above: nobody leaves
    for threshold, routing in ((t, routing_at), (math.nextafter(t, 1.0), routing_above)):
        assert torch.equal(routing.executed, ref_forward(model, idx, early_exit_rule(model, threshold))[1])


# ---------------------------------------------------------------- Mixture-of-Depths


@pytest.mark.parametrize("T, k", [(4, 1), (12, 2), (16, 2)])  # round(0.5) = 0 -> 1; round(1.5) = 2; 2
def test_mod_training_runs_the_top_capacity_share_of_each_sequence(T, k):
    model = make("mod")
    idx = tokens(T=T)
    logits, _, routing = model(idx, targets=idx, mode="soft")
    expected, run, _ = ref_forward(model, idx, mod_rule(model))
    assert (run[..., 2].sum(1) == k).all()
    assert torch.equal(routing.executed, run)
    torch.testing.assert_close(logits, expected, **TOL)
    # the predictor learns top-k membership: BCE of its skip logit against "not in the top k"
    h = ref_block(model.wte.weight[idx] + model.wpe.weight[:T], model.blocks[0], SHAPE["n_head"])
    h = ref_block(h, model.blocks[1], SHAPE["n_head"])
    bce = F.binary_cross_entropy_with_logits(
        ref_router_logit(h, model.predictors["1"]), (~run[..., 2]).double()
    )
    torch.testing.assert_close(routing.aux_loss, bce, **TOL)


def test_mod_sampling_matches_the_reference():
    model = make("mod")
    idx = tokens()
    t = between(ref_forward(model, idx, mod_rule(model, 2.0))[2])
    expected, run, skip = ref_forward(model, idx, mod_rule(model, t))
    assert_clear_of(skip, t)
    assert_mixed(run, [2])
    logits, _, routing = model(idx, mode="hard", threshold=t)
    assert torch.equal(routing.executed, run)
    torch.testing.assert_close(logits, expected, **TOL)


def test_mod_runs_a_token_whose_skip_probability_equals_the_threshold():
    model = make("mod")
    exact_tie_router(model.predictors["1"])
    idx = tokens()
    t = 0.5
    expected, run, skip = ref_forward(model, idx, mod_rule(model, t))
    assert (skip == t).any() and (skip > t).any() and (skip < t).any()
    logits, _, routing = model(idx, mode="hard", threshold=t)
    assert routing.executed[..., 2][skip[..., 0] == t].all()  # == t runs
    assert not routing.executed[..., 2][skip[..., 0] > t].any()
    assert torch.equal(routing.executed, run)
    torch.testing.assert_close(logits, expected, **TOL)


# ---------------------------------------------------------------- distillation


def test_distillation_is_the_kl_from_the_dense_teacher_to_the_student(tmp_path):
    torch.manual_seed(0)
    dense = TSALanguageModel(TSAConfig(**{**SHAPE, "routing": "none"}))
    scramble(dense.model, seed=5)
    path = tmp_path / "dense.ckpt"
    torch.save({"state_dict": dense.state_dict(), "hyper_parameters": dict(dense.hparams)}, path)
    weight = 0.7
    student = TSALanguageModel(TSAConfig(**SHAPE), init_from=str(path), distill_weight=weight)
    student.setup("fit")  # the dense trunk, and the dense model as teacher
    scramble(student.model.routers, seed=6)  # student = trunk with spread routers: its own distribution
    student.trainer = SimpleNamespace(global_step=0, log_every_n_steps=1)
    logged = {}
    student.log = lambda name, value, *a, **k: logged.__setitem__(name, value)
    student.log_dict = lambda values, *a, **k: logged.update(values)
    x, y = tokens(seed=7), tokens(seed=8)

    total = student.training_step((x, y), 0)["loss"]
    kl = logged["train/distill_kl"]
    with torch.no_grad():
        teacher_logits, student_logits = dense.model(x)[0], student.model(x)[0]
    forward, reverse = ref_kl(teacher_logits, student_logits), ref_kl(student_logits, teacher_logits)
    assert forward > 0.05 and abs(forward - reverse) > 0.1 * forward  # the direction is visible here
    torch.testing.assert_close(kl.double(), forward, rtol=1e-5, atol=1e-7)
    assert not torch.isclose(kl.double(), reverse, rtol=1e-3)
    task = F.cross_entropy(student_logits.flatten(0, 1), y.flatten())
    torch.testing.assert_close(total, task + weight * forward.float(), rtol=1e-5, atol=1e-6)

    # one step on the distillation term alone moves the student towards the teacher
    optimizer = torch.optim.SGD(student.model.parameters(), lr=0.05)
    kl.backward()
    optimizer.step()
    with torch.no_grad():
        after = ref_kl(dense.model(x)[0], student.model(x)[0])
    assert after < forward - 1e-4


# ---------------------------------------------------------------- checkpoint compatibility

# every field that fixes the weights (or what they mean), and another valid value for it
CHANGED = {
    "vocab_size": 17,
    "block_size": 8,
    "n_layer": 4,
    "n_head": 4,  # the same weight shapes: only the check can tell
    "n_embd": 32,
    "ffn_hidden": 32,
    "bias": False,
    "routing": "none",
    "router_hidden": 24,
    "mod_every": 3,
}


def test_the_shape_fields_are_exactly_these():
    assert {f.name for f in fields(TSAConfig) if f.metadata.get("shape")} == set(CHANGED)


@pytest.mark.parametrize("name", list(CHANGED))
def test_a_checkpoint_is_refused_by_a_model_with_another_shape_field(name):
    saved = TSALanguageModel(TSAConfig(**SHAPE))
    checkpoint = {"state_dict": saved.state_dict(), "hyper_parameters": dict(saved.hparams)}
    other = TSALanguageModel(TSAConfig(**{**SHAPE, name: CHANGED[name]}))
    with pytest.raises(ValueError, match=rf"trained with a different model: {name}="):
        other.on_load_checkpoint(copy.deepcopy(checkpoint))
    # a field that is not a shape field (a threshold) loads
    same = TSALanguageModel(TSAConfig(**{**SHAPE, "skip_threshold": 0.25}))
    same.on_load_checkpoint(copy.deepcopy(checkpoint))


def test_a_checkpoint_with_another_n_head_is_refused_when_a_trainer_restores_it(tmp_path):
    """n_head changes no weight's shape, so the state dict alone would load silently."""
    saved = TSALanguageModel(TSAConfig(**SHAPE))
    path = tmp_path / "model.ckpt"
    checkpoint = {"state_dict": saved.state_dict(), "hyper_parameters": dict(saved.hparams)}
    torch.save({**checkpoint, "pytorch-lightning_version": lightning.__version__}, path)
    other = TSALanguageModel(TSAConfig(**{**SHAPE, "n_head": 4}))
    other.load_state_dict(saved.state_dict())  # the weights alone fit
    data = DataLoader(TensorDataset(tokens(2, 8), tokens(2, 8, seed=2)), batch_size=2)
    trainer = quiet_trainer()
    with pytest.raises(ValueError, match=r"n_head=2 \(this run: 4\)"):
        trainer.validate(other, data, ckpt_path=path, verbose=False)


def test_a_shape_given_to_load_from_checkpoint_is_refused(tmp_path):
    """Lightning writes load_from_checkpoint's arguments over the saved hyperparameters before the
    module sees them: the check reads the network as saved, kept apart."""
    trainer = quiet_trainer()
    saved = TSALanguageModel(TSAConfig(**SHAPE))
    trainer.strategy.connect(saved)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"n_head=2 \(this run: 4\)"):
        TSALanguageModel.load_from_checkpoint(path, config={**SHAPE, "n_head": 4})
    loaded = TSALanguageModel.load_from_checkpoint(path, config={**SHAPE, "skip_threshold": 0.3})
    assert loaded.config.skip_threshold == 0.3  # how it runs may change, its shape may not
