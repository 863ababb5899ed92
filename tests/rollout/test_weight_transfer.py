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
