"""The learner-side half of tensor weight sync (CPU-checkable): checkpoint names and values without copies."""
from __future__ import annotations

import pytest


@pytest.mark.parametrize("fixture", ["tiny_moe", "tiny_dense"])
def test_checkpoint_tensors_equal_the_saved_checkpoint(fixture, request):
    import safetensors.torch
    from transformers import AutoModelForCausalLM

    from rollout.weight_transfer import checkpoint_tensors

    path = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(path)
    saved = safetensors.torch.load_file(f"{path}/model.safetensors")
    ours = dict(checkpoint_tensors(model))
    assert sorted(ours) == sorted(saved)
    for name, t in ours.items():
        assert t.shape == saved[name].shape and bool((t == saved[name]).all()), name
    storages = {p.untyped_storage().data_ptr() for p in model.state_dict().values()}
    assert all(t.untyped_storage().data_ptr() in storages for t in ours.values())  # views, not copies


class _VllmLikeMoE:
    """vLLM's FusedMoE contract in miniature: fused `w13_weight [E, 2I, H]` / `w2_weight [E, H, I]` parameters
    filled by a per-expert `load_weights` under checkpoint names. `swapped` stores up before gate (a layout
    that differs from HF's fused one), which the loader must detect and route through `load_weights`."""

    def __init__(self, E=3, I=4, H=5, swapped=False):
        import torch

        pre = "model.layers.0.mlp.experts"
        self.E, self.I, self.swapped, self.calls = E, I, swapped, 0
        self._params = {f"{pre}.w13_weight": torch.nn.Parameter(torch.zeros(E, 2 * I, H)),
                        f"{pre}.w2_weight": torch.nn.Parameter(torch.zeros(E, H, I)),
                        "model.layers.0.self_attn.q_proj.weight": torch.nn.Parameter(torch.zeros(H, H))}

    def named_parameters(self):
        return iter(self._params.items())

    def load_weights(self, weights):
        import re

        self.calls += 1
        for name, t in weights:
            m = re.match(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", name)
            if m is None:
                self._params[name].data.copy_(t)
                continue
            e, kind = int(m[2]), m[3]
            if kind == "down":
                self._params[f"{m[1]}.w2_weight"].data[e].copy_(t)
            else:
                first = (kind == "gate") != self.swapped
                rows = slice(0, self.I) if first else slice(self.I, 2 * self.I)
                self._params[f"{m[1]}.w13_weight"].data[e, rows].copy_(t)


@pytest.mark.parametrize("swapped", [False, True])
def test_fused_experts_are_copied_straight_only_where_the_layouts_agree(swapped):
    import torch

    from rollout.weight_transfer import VllmLoader, checkpoint_names

    E, I, H = 3, 4, 5
    pre = "model.layers.0.mlp.experts"
    state = {f"{pre}.gate_up_proj": torch.randn(E, 2 * I, H), f"{pre}.down_proj": torch.randn(E, H, I),
             "model.layers.0.self_attn.q_proj.weight": torch.randn(H, H)}
    oracle = _VllmLikeMoE(E, I, H, swapped)
    oracle.load_weights(checkpoint_names(state.items()))  # vLLM's own per-expert path: what must result
    model = _VllmLikeMoE(E, I, H, swapped)
    loader = VllmLoader(model)
    for version in range(3):  # later syncs take whichever path the first one chose
        new = {n: t + version for n, t in state.items()}
        oracle.load_weights(checkpoint_names(new.items()))
        loader.load(list(new.items()))
        for name, p in model.named_parameters():
            assert torch.equal(p, oracle._params[name]), (version, name)
    assert loader.direct == {"gate_up_proj": not swapped, "down_proj": True}
    if not swapped:  # the two checks, then one call per bucket for the rest (q_proj)
        assert model.calls == 2 + 3
