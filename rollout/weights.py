"""Weight hand-off from the learner to the engines as HF checkpoints, written atomically.

The checkpoint transport (the fallback of `rl.components.weight_sync`, and the final export): the learner
writes a HF checkpoint (sharded safetensors, `bucket_mb` per shard) into the run dir (storage every node
sees), renames it into place, and every engine loads it (`update_weights`). The
rename makes the hand-off atomic: an engine never sees half a checkpoint. The HF format (rather than raw
state-dict names) is what vLLM's loaders and transformers both read; transformers' `save_pretrained`
converts fused in-memory layouts (MoE experts) to the checkpoint names.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")



def export_hf_checkpoint(model, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                         bucket_mb: int = 512, state_dict=None) -> Path:
    """Save `model` (a HF PreTrainedModel; `state_dict` overrides its weights, e.g. gathered from FSDP) as
    a complete HF checkpoint at `out_dir`, atomically. Tokenizer files are copied from `tokenizer_dir`."""
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, max_shard_size=f"{bucket_mb}MB")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
    _fsync_dir(tmp)
    return replace_dir(tmp, out)


def replace_dir(tmp: Path, out: Path) -> Path:
    """Move the finished directory `tmp` to `out`, replacing it. At every instant either the old or the new
    directory is complete under `out` or under `out`'s ".old" sibling (`recover_dir` finds it)."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def recover_dir(out: Path) -> str | None:
    """After a crash: put back the previous directory if the crash hit between the two renames, and
    remove a half-written temp dir. Returns what was found, for the log (None when nothing was wrong)."""
    old = out.with_name(f".{out.name}.old")
    found = []
    if not out.exists() and old.exists():
        old.rename(out)
        found.append(f"restored {out} from {old.name}")
    for tmp in out.parent.glob(f".{out.name}.tmp*") if out.parent.exists() else []:
        shutil.rmtree(tmp, ignore_errors=True)
        found.append(f"removed half-written {tmp.name}")
    return "; ".join(found) or None


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
