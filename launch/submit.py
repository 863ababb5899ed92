"""Run the driver on a Ray cluster.

    python -m launch.submit --address http://127.0.0.1:8265 -- --config-name quickstart trainer.steps=10
    python -m launch.submit --local -- trainer.steps=2     # attach to `ray start --head` on this machine

The config is composed and validated here first (a bad key fails before anything is sent), saved as
`<run_dir>/submitted_config.yaml`, and the job runs `python -m rl.train` with the same overrides plus
`cluster.address=auto` (the job attaches to the cluster it runs on). The working directory is packaged with
Ray's `runtime_env` (`working_dir`, excluding runs/, .venv/ and caches).

`--local` runs the driver in this process, attached to a head started with `start_head` (or
`ray start --head --include-dashboard false`); see `start_head` for what is and is not exposed.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
EXCLUDES = ["runs/", ".venv/", "**/__pycache__/", ".git/", "wandb/", "*.egg-info/"]


def start_head(num_cpus: int | None = None, port: int = 6379, temp_dir: str | None = None) -> str:
    """`ray start --head` with no dashboard and Ray's token authentication (its default); returns the
    GCS address. Ray 2.60 listens on every interface whatever `--node-ip-address` says (measured with
    `ss -ltn`), so the token, not the bind address, is what keeps other hosts out."""
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--include-dashboard", "false", "--disable-usage-stats"]
    cmd += ["--port", str(port)] + (["--num-cpus", str(num_cpus)] if num_cpus else [])
    cmd += ["--temp-dir", temp_dir] if temp_dir else []
    subprocess.run(cmd, check=True, capture_output=True)
    return f"127.0.0.1:{port}"  # reachable from this machine (the head listens on all interfaces)


def prepare(overrides: list[str]) -> tuple[list[str], Path]:
    """Validate the composed config and save it; return the job's rl.train arguments and the run dir."""
    from rl.config import compose, to_schema

    config_name, rest = "config", list(overrides)
    if "--config-name" in rest:
        i = rest.index("--config-name")
        config_name = rest[i + 1]
        del rest[i : i + 2]
    if not any(o.startswith("cluster.address=") for o in rest):
        rest.append("cluster.address=auto")  # the job attaches to the cluster it runs on
    raw = compose(rest, config_name)
    cfg = to_schema(raw)
    run_dir = Path(cfg.trainer.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(raw, run_dir / "submitted_config.yaml")
    return ["--config-name", config_name, *rest], run_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--address", help="the cluster's job server, e.g. http://HEAD:8265 (ray job submit)")
    g.add_argument("--local", action="store_true", help="run the driver here, attached to the local `ray start --head`")
    p.add_argument("train_args", nargs="*", help="after --: rl.train arguments and overrides")
    a = p.parse_args(argv)
    args, run_dir = prepare(a.train_args)
    print(f"config validated and saved to {run_dir / 'submitted_config.yaml'}")
    if a.local:
        from rl.train import main as train

        return train(args)
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(a.address)
    entry = " ".join([sys.executable.split("/")[-1], "-m", "rl.train", *args])
    job = client.submit_job(entrypoint=entry, runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES})
    print(f"submitted {job}; follow with: ray job logs --address {a.address} --follow {job}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
