"""The learner on real components: FSDP2 over gloo (1 and 2 processes), the reference engine's samples."""
from __future__ import annotations

import copy
import dataclasses
import sys

import numpy as np
import pytest
import torch
from ray import cloudpickle

from rl.algos import LossConfig
from rl.learner import Learner, LearnerConfig, LearnerGroup, _PerRank, metric_means, plan_step
from rollout.engine import EngineConfig, SamplingConfig
from rollout.reference_engine import ReferenceEngine

SAMPLING = SamplingConfig(n=4, temperature=0.8, top_p=0.9, max_tokens=10, seed=0)
PROMPTS = [[5, 6, 7, 8], [100, 200, 300], [42, 43], [9, 8, 7, 6, 5]]
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # full_grads runs in the rank actors


def full_grads(learner: Learner) -> dict[str, torch.Tensor]:
    """Unsharded gradients (for the loss-normalisation tests); on a group, every rank must run it."""
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().cpu().clone()
            for n, p in learner.model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def moe_samples(tiny_moe):
    eng = ReferenceEngine(EngineConfig(model=tiny_moe, engine="reference", seed=0))
    samples = [s for g in eng.generate(PROMPTS, SAMPLING) for s in g]
    for i, s in enumerate(samples):
        s.advantage = [1.0, -1.0, 0.5, -0.5][i % 4]
    return samples


@pytest.fixture(scope="module")
def learner(tiny_moe):
    """One in-process rank (world size 1, gloo), shared by the single-process tests."""
    cfg = LearnerConfig(model=tiny_moe, temperature=SAMPLING.temperature, kl_coefs={"default": 0.1},
                        loss_cfg=LossConfig(opsm_delta=0.5))
    return Learner(cfg)


def test_step0_identity(learner, moe_samples):
    """Engine and learner hold the same weights: ratio 1 within 1e-6 and KL < 1e-8 (reference engine)."""
    lp = learner.logprobs(moe_samples)
    err = max(abs(a - b) for s, l in zip(moe_samples, lp) for a, b in zip(s.logprobs, l))
    assert err < 1e-6, err
    sums = learner.accumulate_grads(moe_samples, plan_step(moe_samples, 1, learner.cfg.micro_batch_size))
    learner.optimizer.zero_grad(set_to_none=True)
    m = metric_means(sums)
    assert abs(m["ratio_mean"] - 1) < 1e-6 and m["kl"] < 1e-8
    assert m["routing_agreement"] == 1.0 and m["mismatch_kl"] < 1e-8


def test_sampling_mask_renormalisation_removes_top_p_bias(tiny_moe, moe_samples):
    on = Learner(LearnerConfig(model=tiny_moe, temperature=SAMPLING.temperature))
    off = copy.copy(on)
    off.cfg = LearnerConfig(model=tiny_moe, temperature=SAMPLING.temperature, keep_sampling_mask=False)
    ref = [s.logprobs for s in moe_samples]
    gap_on = max(abs(a - b) for r, l in zip(ref, on.logprobs(moe_samples)) for a, b in zip(r, l))
    gap_off = np.mean([b - a for r, l in zip(ref, off.logprobs(moe_samples)) for a, b in zip(r, l)])
    assert gap_on < 1e-6
    assert gap_off < -1e-3, "without the mask, pi_theta of truncated sampling is systematically lower"


def test_replay_forces_recorded_experts_and_router_gets_gradient(learner, moe_samples):
    import transformers.models.qwen3_moe.modeling_qwen3_moe as qm

    forced = [copy.deepcopy(s) for s in moe_samples[:2]]
    rng = np.random.default_rng(0)
    for s in forced:  # experts the router would not pick: a random pair per position and layer
        s.routed_experts = np.stack([rng.permutation(8)[:2] for _ in range(s.routed_experts.shape[0] * 2)]).reshape(
            s.routed_experts.shape).astype(np.int16)
    used = []
    orig = qm.Qwen3MoeExperts.forward
    qm.Qwen3MoeExperts.forward = lambda self, h, idx, w: (used.append(idx.clone()), orig(self, h, idx, w))[1]
    try:
        sums = learner.accumulate_grads(forced, plan_step(forced, 1, 8))
    finally:
        qm.Qwen3MoeExperts.forward = orig
    T = max(len(s.prompt_ids) + len(s.response_ids) - 1 for s in forced)
    for layer, idx in enumerate(used[:2]):  # the two MoE layers of the (only) micro-batch
        idx = idx.reshape(2, T, 2)
        for b, s in enumerate(forced):
            n = s.routed_experts.shape[0]
            assert torch.equal(idx[b, :n].cpu(), torch.as_tensor(s.routed_experts[:, layer], dtype=torch.long))
    assert metric_means(sums)["routing_agreement"] < 0.5  # the router disagreed, replay won
    grads = full_grads(learner)
    router = [n for n in grads if n.endswith("gate.weight")]
    assert router and all(grads[n].abs().sum() > 0 for n in router)
    learner.optimizer.zero_grad(set_to_none=True)


def test_agreement_is_logged_without_replay(tiny_moe, moe_samples):
    off = Learner(LearnerConfig(model=tiny_moe, temperature=SAMPLING.temperature, keep_routing=False))
    sums = off.accumulate_grads(moe_samples, plan_step(moe_samples, 1, 8))
    assert metric_means(sums)["routing_agreement"] == 1.0  # same weights: the router agrees everywhere


@pytest.mark.slow
def test_two_ranks_equal_one_rank_and_resume_is_exact(ray_cluster, tiny_moe, moe_samples, tmp_path):
    """1 process x 4 micro-batches == 2 processes x 2 micro-batches (gradients); training on a fixed batch
    lowers the loss; resuming from a (background-written, sharded) checkpoint reproduces the next step's loss
    exactly, and at world size 1 up to the reduction order. The domains alternate, so rank 0's shard is all
    beta = 0 (no reference needed there) and rank 1's all beta > 0: the ranks must still run the reference
    forward together (FSDP collectives; a rank skipping it hung NCCL and aborted gloo)."""
    samples = [copy.deepcopy(s) for s in moe_samples[:16]]
    for i, s in enumerate(samples):
        s.domain = ("math", "string")[i % 2]
    base = dict(model=tiny_moe, temperature=SAMPLING.temperature, lr=3e-3, kl_coefs={"math": 0.0, "string": 0.05},
                loss_cfg=LossConfig(opsm_delta=1.0))
    one = LearnerGroup(LearnerConfig(micro_batch_size=4, **base), world_size=1)
    two = LearnerGroup(LearnerConfig(micro_batch_size=4, **base), world_size=2)
    try:
        one._all("accumulate_grads", _PerRank([samples]), plan_step(samples, 1, 4))
        g1 = one.apply(full_grads)[0]
        shards = _PerRank([samples[r::2] for r in range(2)])
        two._all("accumulate_grads", shards, plan_step(samples, 2, 4))
        g2 = two.apply(full_grads)[0]
        assert g1.keys() == g2.keys()
        for k in g1:
            torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-7, msg=k)
        one._all("zero_grads")
        two._all("zero_grads")
        # Metrics missing on a rank (kept_mass, routing_agreement where no sample carries them) are each
        # averaged over their own tokens: the union of keys, not an error, and not diluted by other tokens.
        per_rank = _PerRank([{"a": [2.0, 2.0], "loss": [0.5, 1.0]}, {"a": [4.0, 2.0], "b": [3.0, 3.0], "loss": [0.25, 1.0]}])
        for m in two._all("_reduce_metrics", per_rank, 1.0):
            assert (m["a"], m["b"], m["loss"]) == (1.5, 1.0, 0.75), m

        losses = [two.train_step(samples)["loss"] for _ in range(3)]
        assert losses[-1] < losses[0], losses
        ckpt = str(tmp_path / "ckpt")
        assert two.save_checkpoint(ckpt, {"data_position": 7}, wait=False) == []  # written while the next step trains
        expected = two.train_step(samples)
        assert not (tmp_path / "ckpt").exists() and two.finish_checkpoint() == [ckpt]
        assert sorted(p.name for p in (tmp_path / "ckpt" / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        assert two.load_checkpoint(ckpt) == {"data_position": 7}
        again = two.train_step(samples)
        assert again["loss"] == expected["loss"] and again["grad_norm"] == expected["grad_norm"]
        # Resharded: the two ranks' checkpoint resumes on one rank (same step up to the reduction order).
        assert one.load_checkpoint(ckpt) == {"data_position": 7}
        alone = one.train_step(samples)
        assert alone["loss"] == pytest.approx(expected["loss"], rel=1e-5, abs=1e-7)
        assert alone["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)
    finally:
        one.shutdown()
        two.shutdown()


def _forced_routing(samples, seed=0):
    """Copies whose recorded experts are random pairs the router would not pick (replay must win)."""
    rng = np.random.default_rng(seed)
    out = [copy.deepcopy(s) for s in samples]
    for s in out:
        s.routed_experts = np.stack([rng.permutation(8)[:2] for _ in range(s.routed_experts.shape[0] * 2)]).reshape(
            s.routed_experts.shape).astype(np.int16)
    return out


def test_reference_logprobs_use_replayed_experts_and_kept_sets(learner, moe_samples):
    """pi_ref is computed like pi_theta (replayed experts, kept sets): with reference == policy it equals
    log pi_theta exactly even where the recorded experts are not the router's own choice."""
    from rl.batch import collate

    forced = _forced_routing(moe_samples[:4])
    batch = collate(forced, {"default": 0.1})
    learner.reset_reference()
    with learner._routing(learner.routing, batch, True) as routed:
        logp, _ = learner._forward(learner.model, learner.routing, batch, True, routed)
    ref = learner._ref_logprobs(batch)
    on = batch.loss_mask > 0
    assert torch.equal(ref[on], logp.detach()[on])
    own_router = copy.copy(learner)  # the reference's own router would have given other log-probs
    own_router.cfg = dataclasses.replace(learner.cfg, keep_routing=False)
    assert not torch.allclose(own_router._ref_logprobs(batch)[on], ref[on])


def test_missing_capture_is_an_error(tiny_moe, moe_samples):
    from rl.batch import MissingCapture

    strict = Learner(LearnerConfig(model=tiny_moe, temperature=SAMPLING.temperature, require_routing=True,
                                   require_sampling_mask=True))
    no_routing = copy.deepcopy(moe_samples[:4])
    no_routing[2].routed_experts = None
    with pytest.raises(MissingCapture, match=r"1 of 4 samples carry no routed_experts .* sample 2"):
        strict.accumulate_grads(no_routing, plan_step(no_routing, 1, 8))
    no_mask = copy.deepcopy(moe_samples[:4])
    no_mask[0].kept = None
    with pytest.raises(MissingCapture, match=r"no a sampling mask|sampling mask"):
        strict.accumulate_grads(no_mask, plan_step(no_mask, 1, 8))
    # SFT trains on demonstrations, not engine samples: nothing is required there.
    strict.accumulate_grads(no_routing, plan_step(no_routing, 1, 8), loss="sft")
    strict.zero_grads()


def test_gradient_checkpointing_replays_the_same_experts_in_backward(tiny_moe, moe_samples):
    """Checkpointed layers re-run their routers in backward: the gradients must equal the plain run's."""
    forced = _forced_routing(moe_samples[:4], seed=1)
    grads = []
    for ckpt in (False, True):
        lrn = Learner(LearnerConfig(model=tiny_moe, temperature=SAMPLING.temperature, gradient_checkpointing=ckpt))
        lrn.accumulate_grads(forced, plan_step(forced, 1, 8))
        grads.append(full_grads(lrn))
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


def test_compiled_layers_give_the_eager_gradients(tiny_moe, moe_samples):
    """`compile` on one fp32 rank (no FSDP2: the whole decoder stack is one region) and the log-prob head's
    softmax passes under torch.compile, the engine's experts replayed through the patched routers (eager, between
    graphs) and its kept sets applied; gradients and metrics equal the eager learner's (fp32), over two
    batch shapes, and a third shape compiles nothing new."""
    from torch._dynamo.utils import counters

    forced = _forced_routing(moe_samples[:9], seed=1)
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        lrn = Learner(LearnerConfig(model=tiny_moe, temperature=SAMPLING.temperature, compile=compiled))
        for batch in (forced[:4], forced[4:6]):
            metrics = lrn.accumulate_grads(batch, plan_step(batch, 1, 8))
        runs.append((full_grads(lrn), metric_means(metrics)))
        frames = counters["frames"]["ok"]  # compiled frames so far
        lrn.accumulate_grads(forced[6:], plan_step(forced[6:], 1, 8))  # a third batch shape (size 1 would specialise)
        lrn.zero_grads()
        # Dynamic shapes from the start: a new shape compiles nothing (compiled static first, it recompiles).
        assert counters["frames"]["ok"] == frames and (not compiled or frames > 0)
    torch._dynamo.reset()
    (eager, m_eager), (comp, m_comp) = runs
    assert eager.keys() == comp.keys() and m_eager.keys() == m_comp.keys()
    for k in eager:
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-4, atol=1e-6, msg=k)
    for k in m_eager:
        assert m_comp[k] == pytest.approx(m_eager[k], rel=1e-4, abs=1e-6), k
    assert m_eager["routing_agreement"] < 0.5  # forced experts the routers disagree with: the replay won in both


def _random_samples(B: int, P: int, R: int, seed: int) -> list:
    """Hand-made completed samples (a dense model needs no captures): prompt P + b, response R - b tokens."""
    from rollout.sample import Sample, Status

    g = torch.Generator().manual_seed(seed)
    return [Sample(prompt_ids=torch.randint(1, 1000, (P + b,), generator=g).tolist(),
                   response_ids=torch.randint(1, 1000, (R - b,), generator=g).tolist(), logprobs=[-1.0] * (R - b),
                   loss_mask=[1] * (R - b), status=Status.COMPLETED, advantage=float(b % 2) - 0.5) for b in range(B)]


def test_compiled_layers_give_the_eager_step(tiny_dense, tiny_moe):
    """`compile` under bf16 FSDP2 compiles each decoder layer, and nothing else of the decoder (the whole stack
    traced with symbolic shapes did not finish on the GPU), also for an MoE under one FSDP2 unit. Per-layer and
    one-unit FSDP2, with and without gradient checkpointing, give the eager step's gradients and metrics (bf16:
    compiled fusion moves them ~2% of each gradient's largest entry, the tolerance is 5%: this catches a layer that
    drops or zeroes gradients; the head's exact values are test_logprobs' compiled-vs-eager test), and a new batch
    shape compiles nothing."""
    from torch._dynamo.utils import counters

    def regions(lrn):
        base = getattr(lrn.model, lrn.model.base_model_prefix)
        compiled = lambda m: getattr(m, "_compiled_call_impl", None) is not None  # noqa: E731
        return compiled(base), [compiled(layer) for layer in base.layers]

    moe = Learner(LearnerConfig(model=tiny_moe, param_dtype="bfloat16", fsdp_wrap="model", compile=True))
    assert regions(moe) == (False, [True] * len(regions(moe)[1]))
    del moe
    batches = [_random_samples(3, 6, 14, seed=0), _random_samples(2, 9, 11, seed=1)]
    on_policy = Learner(LearnerConfig(model=tiny_dense, param_dtype="bfloat16"))
    for batch in batches:  # the policy's own log-probs: ratios near 1, gradients of full size
        for s, lp in zip(batch, on_policy.logprobs(batch)):
            s.logprobs = lp
    del on_policy
    runs = {}
    for wrap, compiled, ckpt in (("layer", False, False), ("layer", True, False), ("model", True, False),
                                 ("model", True, True)):
        torch._dynamo.reset()
        counters.clear()
        lrn = Learner(LearnerConfig(model=tiny_dense, param_dtype="bfloat16", fsdp_wrap=wrap, compile=compiled,
                                    gradient_checkpointing=ckpt))
        stack, layers = regions(lrn)
        assert not stack and layers == [compiled] * len(layers)
        for batch in batches:
            metrics = lrn.accumulate_grads(batch, plan_step(batch, 1, 8))
        runs[wrap, compiled, ckpt] = (full_grads(lrn), metric_means(metrics))
        frames = counters["frames"]["ok"]
        third = _random_samples(4, 5, 9, seed=2)
        lrn.accumulate_grads(third, plan_step(third, 1, 8))
        lrn.zero_grads()
        assert counters["frames"]["ok"] == frames and (not compiled or frames > 0)
    torch._dynamo.reset()
    eager, m_eager = runs["layer", False, False]
    assert m_eager["ratio_mean"] == pytest.approx(1.0, abs=0.05)
    for key, (grads, m) in runs.items():
        for k in eager:
            scale = float(eager[k].abs().max())
            torch.testing.assert_close(grads[k], eager[k], rtol=0, atol=0.05 * scale + 1e-6, msg=f"{key} {k}")
        for k in m_eager:
            assert m[k] == pytest.approx(m_eager[k], rel=0.02, abs=1e-3), (key, k)


def test_activation_memory_budget_recomputes_in_the_compiled_backward(tiny_dense):
    """`activation_memory_budget` < 1 under `compile`: backward keeps fewer bytes of saved tensors (the
    partitioner recomputes the cheap ops instead) for the same gradients (fp32: recomputation repeats the same
    kernels), and the budget is the learner's own: the process-wide setting is left as it was."""
    from torch._functorch import config as functorch_config

    batch = _random_samples(3, 6, 14, seed=0)
    runs = {}
    for budget in (1.0, 0.3):
        torch._dynamo.reset()
        lrn = Learner(LearnerConfig(model=tiny_dense, compile=True, activation_memory_budget=budget))
        lrn.accumulate_grads(batch, plan_step(batch, 1, 8))  # compiles
        lrn.zero_grads()
        saved, weights = [], {p.data_ptr() for p in lrn.model.parameters()}  # weights: saved, but no extra memory
        keep = lambda t, saved=saved, weights=weights: saved.append(  # noqa: E731
            0 if t.data_ptr() in weights else t.numel() * t.element_size()) or t
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            lrn.accumulate_grads(batch, plan_step(batch, 1, 8))
        runs[budget] = sum(saved), full_grads(lrn)
        assert functorch_config.activation_memory_budget == 1.0
    torch._dynamo.reset()
    assert runs[0.3][0] < 0.8 * runs[1.0][0], {b: r[0] for b, r in runs.items()}
    for k, g in runs[1.0][1].items():
        torch.testing.assert_close(runs[0.3][1][k], g, rtol=1e-5, atol=1e-7, msg=k)


def _grads_metrics_then_step(lrn, samples, micro_batch_size: int):
    """(full gradients, metrics) of one accumulation, then the weights after an optimiser step on the samples."""
    plan = plan_step(samples, 1, micro_batch_size)
    metrics = metric_means(lrn.accumulate_grads(samples, plan))
    grads = full_grads(lrn)
    lrn.zero_grads()
    lrn.train_step(samples, plan)
    return grads, metrics, lrn.full_state_dict()


def test_one_fsdp_unit_gives_the_per_layer_step(tiny_moe, moe_samples, tmp_path):
    """`fsdp_wrap=model` (one FSDP2 unit: one gather and one reduction a micro-batch) against the per-layer
    units, bf16 mixed precision with the engine's experts replayed: the same casts and fp32 reductions, so the
    same gradients, metrics and weights after an optimiser step, to the bit; and its checkpoint resumes under
    the per-layer units (the same parameter names), the next step again equal."""
    forced = _forced_routing(moe_samples[:4], seed=2)
    cfg = lambda wrap: LearnerConfig(model=tiny_moe, temperature=SAMPLING.temperature, param_dtype="bfloat16",  # noqa: E731
                                     fsdp_wrap=wrap, kl_coefs={"default": 0.1})
    runs = []
    for wrap in ("layer", "model"):
        lrn = Learner(cfg(wrap))
        units = sum(hasattr(m, "reshard") for m in lrn.model.modules())  # FSDP2 modules
        assert units == (1 if wrap == "model" else 1 + lrn.model.config.num_hidden_layers)
        runs.append(_grads_metrics_then_step(lrn, forced, 4))
    (g1, m1, w1), (g2, m2, w2) = runs
    assert g1.keys() == g2.keys() and m1 == m2 and w1.keys() == w2.keys()
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
    lrn.save_checkpoint(str(tmp_path / "ckpt"))  # the one-unit learner, after its step
    back = Learner(cfg("layer"))
    back.load_checkpoint(str(tmp_path / "ckpt"))
    for x in (lrn, back):
        x.train_step(forced, plan_step(forced, 1, 4))
    w1, w2 = lrn.full_state_dict(), back.full_state_dict()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_meta_device_bf16_load_equals_the_checkpoint(tiny_moe, moe_samples):
    """bf16 mixed precision shards a model built on the meta device and filled from rank 0: the fp32
    master weights equal the checkpoint's and the log-probs match the fp32 learner to bf16 precision
    (wrong rotary buffers would not)."""
    from transformers import AutoModelForCausalLM

    bf16 = Learner(LearnerConfig(model=tiny_moe, temperature=SAMPLING.temperature, param_dtype="bfloat16"))
    want = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32).state_dict()
    got = bf16.full_state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k].float(), want[k]), k
    fp32 = Learner(LearnerConfig(model=tiny_moe, temperature=SAMPLING.temperature))
    a, b = fp32.logprobs(moe_samples[:4]), bf16.logprobs(moe_samples[:4])
    err = max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))
    assert err < 0.1, err


def test_resume_restores_the_distilled_reference(tiny_moe, moe_samples, tmp_path):
    """After SFT the reference is reset to the distilled policy; a resumed run must anchor its KL there,
    not to the initial weights (the checkpoint carries the reference)."""
    cfg = LearnerConfig(model=tiny_moe, temperature=SAMPLING.temperature, lr=1e-2, kl_coefs={"default": 0.1})
    first = Learner(cfg)
    sft = copy.deepcopy(moe_samples[:8])
    first.train_step(sft, plan_step(sft, 1, 8), loss="sft")
    first.reset_reference()
    first.save_checkpoint(str(tmp_path / "ckpt"))
    resumed = Learner(cfg)
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    init = Learner(LearnerConfig(model=tiny_moe)).model.state_dict()
    ref = resumed.ref.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in first.ref.state_dict().items())
    assert any(not torch.equal(ref[k], init[k]) for k in init)


def test_resume_before_the_first_optimizer_step_trains_like_the_uninterrupted_learner(tiny_moe, moe_samples, tmp_path):
    """A checkpoint taken before any optimizer step (a stop before step 1; a scheduler that stepped on a
    skipped non-finite step) leaves the optimizer out: DCP would initialise AdamW by a zero-gradient step and
    the resumed one would start at step 2 (another bias correction), and the fresh optimizer takes the
    schedule's learning rate. The next step then equals the uninterrupted learner's exactly."""
    cfg = LearnerConfig(model=tiny_moe, temperature=SAMPLING.temperature, lr=1e-2, warmup_steps=3)
    first = Learner(cfg)
    first.scheduler.step()  # as after a step whose update was skipped
    first.save_checkpoint(str(tmp_path / "ckpt"))
    assert not first.optimizer.state  # saving did not initialise it
    resumed = Learner(cfg)
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    assert not resumed.optimizer.state and resumed.optimizer.param_groups[0]["lr"] == first.optimizer.param_groups[0]["lr"]
    batch = copy.deepcopy(moe_samples[:8])
    for lrn in (first, resumed):
        lrn.train_step(copy.deepcopy(batch), plan_step(batch, 1, 8))
    after = resumed.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in first.model.state_dict().items())


def test_one_rank_gradient_copy_in_equals_fsdp_chunk_cat():
    """The world-size-1 copy-in (a foreach copy) fills FSDP2's reduce-scatter buffer exactly as its chunk_cat does,
    casting bf16 gradients into the fp32 buffer; other world sizes still go to chunk_cat."""
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as fc

    from rl.learner import _flat_grad_copy_in_at_one_rank

    current = fc.foreach_reduce_scatter_copy_in  # patched already if this process built a bf16 learner
    original = fc.foreach_reduce_scatter_copy_in = getattr(current, "chunk_cat", current)
    _flat_grad_copy_in_at_one_rank()
    _flat_grad_copy_in_at_one_rank()  # idempotent: wraps once
    patched = fc.foreach_reduce_scatter_copy_in
    try:
        assert patched is not original and getattr(patched, "flat_at_one_rank", False)
        g = torch.Generator().manual_seed(0)
        grads = [torch.randn(*s, generator=g).to(torch.bfloat16) for s in [(7, 5), (3,), (4, 2, 3), (1, 1)]]
        n = sum(t.numel() for t in grads)
        ours, theirs = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
        patched(grads, ours, 1)
        original(grads, theirs, 1)
        assert torch.equal(ours, theirs) and torch.equal(ours, torch.cat([t.reshape(-1).float() for t in grads]))
        even = [torch.randn(4, 3, generator=g), torch.randn(2, 5, generator=g)]
        ours, theirs = torch.zeros(22), torch.zeros(22)
        patched(even, ours, 2)
        original(even, theirs, 2)
        assert torch.equal(ours, theirs)
    finally:
        fc.foreach_reduce_scatter_copy_in = current


@pytest.mark.parametrize("wrap", ["model", "layer"])
def test_one_rank_unshard_with_one_cast_gives_fsdps_step(tiny_moe, moe_samples, wrap):
    """At one rank the unshard fills every unsharded bf16 buffer with one foreach copy and FSDP's own loop copies
    each onto itself: the same gradients, metrics and weights as FSDP's per-parameter casts, to the bit, over two
    micro-batches and an optimiser step (a unit per layer unshards again in backward, where the forward saved the
    buffers: a version bump there would fail the backward); and the foreach path is the one taken."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    from rl.learner import _unshard_with_one_cast_at_one_rank

    forced = _forced_routing(moe_samples[:4], seed=4)
    cfg = LearnerConfig(model=tiny_moe, temperature=SAMPLING.temperature, param_dtype="bfloat16", fsdp_wrap=wrap,
                        micro_batch_size=2)
    _unshard_with_one_cast_at_one_rank()  # as any bf16 learner installs it; idempotent
    patched_unshard, patched_inputs = FSDPParamGroup.wait_for_unshard, FSDPParam.all_gather_inputs
    assert FSDPParamGroup.one_cast_at_one_rank and patched_unshard.fsdp is not patched_unshard
    _unshard_with_one_cast_at_one_rank()
    assert FSDPParamGroup.wait_for_unshard is patched_unshard
    filled = {True: [], False: []}  # per learner: was each parameter's input a prefilled buffer?
    runs = []
    try:
        for one_cast in (True, False):
            if not one_cast:  # FSDP's own unshard for the second learner
                FSDPParamGroup.wait_for_unshard = patched_unshard.fsdp
            FSDPParam.all_gather_inputs = property(
                lambda p, seen=filled[one_cast]: seen.append("_filled_at_one_rank" in p.__dict__) or patched_inputs.fget(p))
            runs.append(_grads_metrics_then_step(Learner(cfg), forced, 2))
    finally:
        FSDPParamGroup.wait_for_unshard, FSDPParam.all_gather_inputs = patched_unshard, patched_inputs
    assert filled[True] and all(filled[True]) and filled[False] and not any(filled[False])  # every unshard, or none
    (g1, m1, w1), (g2, m2, w2) = runs
    assert m1 == m2 and g1.keys() == g2.keys() and all(torch.equal(g1[k], g2[k]) for k in g1)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


@pytest.mark.parametrize("wrap", ["model", "layer"])
def test_one_rank_in_place_reduce_gives_fsdps_gradients(tiny_moe, moe_samples, wrap):
    """At one rank every FSDP unit's reduce-scatter hands back its input buffer (no second fp32 copy of the
    gradients): the gradients are views of one buffer per unit, and equal FSDP's own reduction's to the bit, over
    two micro-batches (the second accumulates) and after an optimiser step, for one unit and a unit per layer."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    forced = _forced_routing(moe_samples[:4], seed=3)
    runs = []
    for in_place in (True, False):
        lrn = Learner(LearnerConfig(model=tiny_moe, temperature=SAMPLING.temperature, param_dtype="bfloat16",
                                    fsdp_wrap=wrap, micro_batch_size=2))
        if not in_place:
            for m in lrn.model.modules():
                if isinstance(m, FSDPModule):
                    m.set_custom_reduce_scatter(DefaultReduceScatter())
        elif wrap == "model":
            comm = lrn.model._get_fsdp_state()._fsdp_param_groups[0]._reduce_scatter_comm
            given, allocate = [], comm.allocate
            comm.allocate = lambda *a, given=given, allocate=allocate, **k: given.append(allocate(*a, **k)) or given[-1]
            lrn.accumulate_grads(forced[:2], plan_step(forced[:2], 1, 2))  # one micro-batch: input, then output
            assert len(given) == 2 and given[1].data_ptr() == given[0].data_ptr()
            grads = {p.grad.to_local().untyped_storage().data_ptr() for p in lrn.model.parameters() if p.grad is not None}
            assert grads == {given[0].untyped_storage().data_ptr()}
            comm.allocate = allocate
            lrn.zero_grads()
        runs.append(_grads_metrics_then_step(lrn, forced, 2))
    (g1, m1, w1), (g2, m2, w2) = runs
    assert m1 == m2 and g1.keys() == g2.keys() and all(torch.equal(g1[k], g2[k]) for k in g1)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
