"""DSA: dense equivalence when k >= L, causal selection, the two training stages, and the engine/learner path."""
from __future__ import annotations

import pytest
import torch

from rl.dsa import DSA_LOSSES, layer_states
from rl.learner import Learner, LearnerConfig
from rollout.dsa import attention_modules, install_dsa, keep_for_loss
from rollout.engine import EngineConfig, SamplingConfig
from rollout.reference_engine import ReferenceEngine, load_hf_model
from rollout.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def dsa_model_dir(tmp_path_factory) -> str:
    return str(build_tiny_model("dense", tmp_path_factory.mktemp("dsa"), seed=0, dsa_top_k=4))


def _ids(B=2, L=12, seed=0):
    return torch.randint(3, 1000, (B, L), generator=torch.Generator().manual_seed(seed))


def test_k_at_least_length_equals_dense_exactly(tiny_dense):
    ids = _ids()
    dense = load_hf_model(tiny_dense, "float32")
    dense.set_attn_implementation("eager")
    sparse = load_hf_model(tiny_dense, "float32")
    install_dsa(sparse, top_k=ids.shape[1])
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, sparse(ids).logits)
        install_dsa(sparse, top_k=4)  # now it is really sparse: outputs change
        assert not torch.allclose(dense(ids).logits, sparse(ids).logits)


def test_selection_is_causal_and_top_k(dsa_model_dir):
    model = load_hf_model(dsa_model_dir, "float32")
    keep_for_loss(model, True)
    with torch.no_grad():
        model(_ids(L=10))
    for s in layer_states(model):
        sel, allowed = s["selected"], s["allowed"]
        causal = torch.ones(10, 10, dtype=torch.bool).tril()
        assert torch.equal(allowed[0], causal) and not (sel & ~allowed).any()
        assert sel.sum(-1)[0].tolist() == [min(4, t + 1) for t in range(10)]
        # the chosen keys are the indexer's highest-scoring causal keys
        t = 9
        best = s["index"][0, t].masked_fill(~causal[t], float("-inf")).topk(4).indices
        assert set(best.tolist()) == set(sel[0, t].nonzero().squeeze(-1).tolist())


def test_dense_warmup_kl_decreases_on_a_fixed_batch(dsa_model_dir):
    model = load_hf_model(dsa_model_dir, "float32")
    for n, p in model.named_parameters():
        p.requires_grad_(".indexer." in n)
    for a in attention_modules(model):
        a._dsa_top_k = 1 << 30  # dense
    keep_for_loss(model, True)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, kls = _ids(B=4, L=16), []
    for _ in range(30):
        model(ids)
        loss = DSA_LOSSES.get("dense_warmup")(layer_states(model))
        opt.zero_grad()
        loss.backward()
        opt.step()
        kls.append(loss.item())
    assert kls[-1] < 0.5 * kls[0], kls[::5]


def test_sparse_stage_indexer_loss_does_not_reach_the_main_model(dsa_model_dir):
    model = load_hf_model(dsa_model_dir, "float32").train()
    keep_for_loss(model, True, detach_indexer_input=True)
    out = model(_ids(L=16))
    DSA_LOSSES.get("sparse")(layer_states(model)).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if ".indexer." not in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".indexer." in n)
    # Without the detach the same loss would flow into the main model (the test can fail).
    model.zero_grad(set_to_none=True)
    keep_for_loss(model, True, detach_indexer_input=False)
    model(_ids(L=16))
    DSA_LOSSES.get("sparse")(layer_states(model)).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".indexer." not in n)
    del out


def test_engine_and_learner_agree_with_dsa(dsa_model_dir):
    """The reference engine (KV-cached, indexer key cache) and the learner (full forward) compute the same
    sparse policy: step-0 log-probs match."""
    eng = ReferenceEngine(EngineConfig(model=dsa_model_dir, engine="reference", seed=0))
    groups = eng.generate([[5, 6, 7, 8, 9, 10, 11], [100, 200, 300]], SamplingConfig(n=2, max_tokens=12, seed=0))
    samples = [s for g in groups for s in g]
    learner = Learner(LearnerConfig(model=dsa_model_dir, dsa_loss="sparse"))
    lp = learner.logprobs(samples)
    err = max(abs(a - b) for s, l in zip(samples, lp) for a, b in zip(s.logprobs, l))
    assert err < 1e-5, err
    for s in samples:
        s.advantage = 1.0
    from rl.learner import plan_step

    m = learner.train_step(samples, plan_step(samples, 1, 8))
    assert m["dsa_indexer_kl"] > 0 and torch.isfinite(torch.tensor(m["loss"]))
    learner.shutdown()
