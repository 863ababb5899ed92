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
    """vLLM 0.26's MoE layout in miniature: the MoE layer's `routed_experts` child holds the fused
    `w13_weight [E, 2I, H]` / `w2_weight [E, H, I]` and the `quant_method` (with its kernel backend), filled
    by a per-expert `load_weights` under checkpoint names. `swapped` stores up before gate (a layout other
    than HF's fused one), which the loader must detect and route through `load_weights`."""

    def __init__(self, E=3, I=4, H=5, swapped=False, backend="TRITON"):
        import types

        import torch

        self.E, self.I, self.swapped, self.calls = E, I, swapped, 0
        routed = torch.nn.Module()
        routed.w13_weight = torch.nn.Parameter(torch.zeros(E, 2 * I, H))
        routed.w2_weight = torch.nn.Parameter(torch.zeros(E, H, I))
        method = type("UnquantizedFusedMoEMethod", (), {})()
        if backend is not None:
            method.unquantized_backend = types.SimpleNamespace(name=backend)
        routed.quant_method = method
        self.root = torch.nn.Module()
        self.root.add_module("model", torch.nn.Module())
        layer = torch.nn.Module()
        layer.add_module("routed_experts", routed)
        attn = torch.nn.Module()
        attn.q_proj = torch.nn.Linear(H, H, bias=False)
        torch.nn.init.zeros_(attn.q_proj.weight)
        self.root.model.add_module("layers", torch.nn.ModuleList([torch.nn.Module()]))
        self.root.model.layers[0].add_module("mlp", torch.nn.Module())
        self.root.model.layers[0].mlp.add_module("experts", layer)
        self.root.model.layers[0].add_module("self_attn", attn)
        self._params = dict(self.root.named_parameters())

    def get_submodule(self, name):
        return self.root.get_submodule(name)

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
                self._params[f"{m[1]}.routed_experts.w2_weight"].data[e].copy_(t)
            else:
                first = (kind == "gate") != self.swapped
                rows = slice(0, self.I) if first else slice(self.I, 2 * self.I)
                self._params[f"{m[1]}.routed_experts.w13_weight"].data[e, rows].copy_(t)


def _state(E=3, I=4, H=5):
    import torch

    pre = "model.layers.0.mlp.experts"
    return {f"{pre}.gate_up_proj": torch.randn(E, 2 * I, H), f"{pre}.down_proj": torch.randn(E, H, I),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(H, H)}


@pytest.mark.parametrize("swapped, backend", [(False, "TRITON"), (True, "TRITON"), (False, None)],
                         ids=["as-loaded", "other-layout", "unknown-kernel"])
def test_fused_experts_are_copied_straight_only_where_the_layouts_agree(swapped, backend):
    import torch

    from rollout.weight_transfer import VllmLoader, checkpoint_names

    state = _state()
    oracle = _VllmLikeMoE(swapped=swapped, backend=backend)
    model = _VllmLikeMoE(swapped=swapped, backend=backend)
    loader = VllmLoader(model)
    for version in range(3):  # later syncs take whichever path the first one chose
        new = {n: t + version for n, t in state.items()}
        oracle.load_weights(checkpoint_names(new.items()))  # vLLM's own per-expert path: what must result
        loader.load(list(new.items()))
        for name, p in model.named_parameters():
            assert torch.equal(p, oracle._params[name]), (version, name)
    direct = backend == "TRITON"
    assert loader.direct == {"gate_up_proj": direct and not swapped, "down_proj": direct}
    assert loader.direct_copies == 3 * ((direct and not swapped) + direct)


def test_a_kernel_that_converts_the_experts_after_loading_is_refused():
    from rollout.weight_transfer import VllmLoader

    with pytest.raises(RuntimeError, match=r"backend FLASHINFER_CUTLASS\) converts the expert weights.*trainer.weight_sync=checkpoint"):
        VllmLoader(_VllmLikeMoE(backend="FLASHINFER_CUTLASS")).load(list(_state().items()))
