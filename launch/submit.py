"""Run the driver on a Ray cluster.

    python -m launch.submit --address http://HEAD:8265 -- --config-name quickstart trainer.steps=10
    python -m launch.submit --address http://HEAD:8265 --remote-paths --runtime-env env.yaml --wait -- \\
        model=local model.path=/shared/ckpt data.train=/shared/data/train.jsonl trainer.run_dir=/shared/runs/a
    python -m launch.submit --local -- trainer.steps=2     # attach to `ray start --head` on this machine

`--config-dir DIR` (your configs, as for `rl.train`) travels with the job when DIR is inside the packaged
working directory; a DIR elsewhere needs `--remote-paths` (it must then exist at that path on the cluster).

The config is composed and validated here first (a bad key fails before anything is sent), saved as
`<run_dir>/submitted_config.yaml` when that directory can be created here, and the job runs
`python -m rl.train` with the same overrides plus `cluster.address=auto` (the job attaches to the cluster
it runs on). The entrypoint is built with `shlex.join`, so an override with spaces, quotes or shell
characters reaches the job as the one argument it was here.

`--remote-paths`: paths that exist only on the cluster (`model.path`, `agent.docs`) are not checked here;
the job checks them when it starts. The working directory is packaged with Ray's `runtime_env`
(`working_dir`, excluding runs/, .venv/, caches and what .gitignore lists); `--runtime-env FILE` /
`--runtime-env-json JSON` (the `ray job submit` options) add to it or replace its keys, and `env_vars` are
merged: `--env-var NAME=VALUE` (or `NAME`: this shell's value) over the runtime env's, over the forwarded
ones. `WANDB_API_KEY` is forwarded from this shell when it is set.

Secrets: values of forwarded variables are never printed nor written by this command (not in the saved
config, not in the run dir). They travel in the job's runtime env, as Ray passes every `env_vars`: the
dashboard redacts them for browsers, the Jobs API returns them to authenticated clients, and Ray's
runtime-env agent writes them in its own log on the cluster (`runtime_env_agent.log` under the head's Ray
temp dir). Where that is not acceptable, set the key in the cluster nodes' environment instead.

Authentication: a cluster with Ray's token authentication needs its token here (`~/.ray/auth_token`,
`RAY_AUTH_TOKEN` or `RAY_AUTH_TOKEN_PATH`); when one is found, token mode is switched on for the client,
as `ray start` does.

`--local` runs the driver in this process, attached to a head started with `start_head` (or
`ray get-auth-token --generate` then `ray start --head --include-dashboard false`: without a token, Ray 2.60's
head has no authentication); see `start_head` for what is and is not exposed.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
EXCLUDES = ["runs/", ".venv/", "**/__pycache__/", ".git/", "wandb/", "*.egg-info/"]
FORWARDED_ENV = ("WANDB_API_KEY",)  # forwarded from the submitting shell when set
# Config keys that `rl.config.validate` checks on the local filesystem; `--remote-paths` leaves them to the job.
REMOTE_PATH_KEYS = ("model.path", "agent.docs")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(num_cpus: int | None = None, port: int = 6379, temp_dir: str | None = None,
               jobs_port: int | None = None) -> str:
    """`ray start --head` with Ray's token authentication; returns the GCS address. Ray 2.60's `ray start` turns
    authentication on only when it finds a token, so one is generated into ~/.ray/auth_token first when there is
    none (`ray get-auth-token --generate`; drivers and `launch.submit` on this machine find it there). No
    dashboard, unless `jobs_port` is given: then the dashboard, which serves the Jobs API that
    `--address http://127.0.0.1:<jobs_port>` submits to, listens on 127.0.0.1 only. Ray 2.60's other
    servers listen on every interface whatever `--node-ip-address` says (measured with `ss -ltn`), so the
    token, not the bind address, is what keeps other hosts out."""
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--disable-usage-stats", "--port", str(port)]
    if jobs_port is None:
        cmd += ["--include-dashboard", "false"]
    else:  # the per-node agent that runs jobs has a fixed default port; another Ray on the host may hold it
        cmd += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(jobs_port),
                "--dashboard-agent-listen-port", str(_free_port())]
    cmd += (["--num-cpus", str(num_cpus)] if num_cpus else []) + (["--temp-dir", temp_dir] if temp_dir else [])
    subprocess.run([cmd[0], "get-auth-token", "--generate"], check=True, capture_output=True)  # prints it: kept quiet
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file():  # Ray writes it with the umask's mode (0644): other users could join the cluster
        token.chmod(0o600)
    subprocess.run(cmd, check=True, capture_output=True)
    return f"127.0.0.1:{port}"  # reachable from this machine (the head listens on all interfaces)


def prepare(overrides: list[str], remote_paths: bool = False, local: bool = False) -> tuple[list[str], Path | None]:
    """Validate the composed config and save it; return the job's rl.train arguments and where the config
    was saved (None when the run dir, a cluster path, cannot be created here). `local`: the driver runs in
    this process (`--local`), so a --config-dir stays a path of this machine."""
    from rl.config import cli_parser, compose, to_schema

    a = cli_parser("rl.train's arguments", list(overrides)).parse_args(list(overrides))  # rl.train's own command line
    if a.cfg:
        raise SystemExit("--cfg job: print the composed config here with `python -m rl.train --cfg job ...`; a job has no terminal")
    config_name, rest = a.config_name, list(a.overrides)
    if not any(o.startswith("cluster.address=") for o in rest):
        rest.append("cluster.address=auto")  # the job attaches to the cluster it runs on
    raw = compose(rest, config_name, a.config_dir)
    job_dir = _job_config_dir(a.config_dir, remote_paths, local) if a.config_dir else None
    cfg = to_schema(_local_stand_ins(raw) if remote_paths else raw)
    saved = Path(cfg.trainer.run_dir) / "submitted_config.yaml"
    try:
        saved.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(raw, saved)
    except OSError as exc:
        if not remote_paths:
            raise
        print(f"note: trainer.run_dir={saved.parent} cannot be created here ({exc.strerror}); the config is not saved locally")
        saved = None
    return ["--config-name", config_name, *(["--config-dir", job_dir] if job_dir else []), *rest], saved


def _job_config_dir(config_dir: str, remote_paths: bool, local: bool) -> str:
    """The job's --config-dir: this machine's path with --local (the driver runs here); relative to the
    packaged working directory when the folder is inside it (the job runs there); as given with
    --remote-paths (the user says it exists on the cluster); otherwise the job could not see it, which fails
    here rather than on the cluster."""
    here = Path(config_dir).resolve()
    if local:
        return str(here)
    if here.is_relative_to(ROOT):
        return str(here.relative_to(ROOT))
    if remote_paths:
        return config_dir
    raise SystemExit(f"--config-dir {config_dir}: outside the working directory that is packaged for the job ({ROOT}), "
                     "so the job could not read it; move it inside, or pass --remote-paths if it exists on the cluster")


def _local_stand_ins(raw):
    """A copy of the composed config whose cluster-only paths point at a local stand-in that passes the
    existence checks; every other check still runs on the user's values."""
    stand_in = Path(tempfile.mkdtemp(prefix="v32rl-remote-"))
    (stand_in / "config.json").write_text("{}")
    checked = copy.deepcopy(raw)
    for key in REMOTE_PATH_KEYS:
        if OmegaConf.select(checked, key) is not None:
            OmegaConf.update(checked, key, str(stand_in))
    return checked


def entrypoint(python: str, train_args: list[str]) -> str:
    """The job's shell command: each argument quoted, so the job's rl.train gets the same argv."""
    return shlex.join([python, "-m", "rl.train", *train_args])


def job_runtime_env(user: dict, env_args: list[str], environ: dict) -> tuple[dict, list[str]]:
    """The job's runtime env (see the module docstring for the merge) and the names of the variables whose
    values come from `environ` (for messages: values are never shown)."""
    user_vars = dict(user.get("env_vars") or {})
    from_shell = {k: environ[k] for k in FORWARDED_ENV if environ.get(k) and k not in user_vars}
    explicit = {}
    for item in env_args:
        name, eq, value = item.partition("=")
        if eq:
            explicit[name] = value
            from_shell.pop(name, None)
        elif name in environ:
            explicit[name] = from_shell[name] = environ[name]
        else:
            raise SystemExit(f"error: --env-var {name}: not set in this environment")
    env = {"working_dir": str(ROOT), "excludes": EXCLUDES, **user}
    env["env_vars"] = {**from_shell, **user_vars, **explicit}
    return env, sorted(from_shell)


def _read_runtime_env(path: str | None, text: str | None) -> dict:
    if path and text:
        raise SystemExit("error: give --runtime-env or --runtime-env-json, not both")
    if path:
        import yaml

        loaded = yaml.safe_load(Path(path).read_text())
    elif text:
        loaded = json.loads(text)
    else:
        return {}
    if not isinstance(loaded, dict):
        raise SystemExit(f"error: the runtime env must be a mapping, got {type(loaded).__name__}")
    return loaded


def _jobs_client(address: str):
    """A Jobs API client; with a local Ray token, in token mode (the Jobs API refuses requests without it)."""
    from rl.cluster import enable_token_auth_if_available

    enable_token_auth_if_available()
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def wait_for_job(client, job: str, poll_s: float = 1.0) -> int:
    """Wait for the job to end, print its logs; 0 if it succeeded, 1 otherwise."""
    from ray.job_submission import JobStatus

    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(poll_s)
    print(client.get_job_logs(job), end="")
    print(f"job {job}: {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--address", help="the cluster's job server, e.g. http://HEAD:8265 (ray job submit)")
    g.add_argument("--local", action="store_true", help="run the driver here, attached to the local `ray start --head`")
    p.add_argument("--remote-paths", action="store_true",
                   help=f"do not check {', '.join(REMOTE_PATH_KEYS)} here: they exist on the cluster")
    p.add_argument("--runtime-env", metavar="FILE", help="a YAML/JSON runtime env for the job (as ray job submit)")
    p.add_argument("--runtime-env-json", metavar="JSON", help="the same, inline")
    p.add_argument("--env-var", action="append", default=[], metavar="NAME[=VALUE]",
                   help="set in the job's environment; NAME alone forwards this shell's value (never printed)")
    p.add_argument("--python", default="python", help="the interpreter on the cluster (default: python)")
    p.add_argument("--wait", action="store_true", help="wait for the job, print its logs, exit 1 if it failed")
    p.add_argument("train_args", nargs="*", help="after --: rl.train arguments and overrides")
    a = p.parse_args(argv)
    args, saved = prepare(a.train_args, a.remote_paths, local=a.local)
    print("config validated" + (f" and saved to {saved}" if saved else ""))
    if a.local:
        from rl.train import main as train

        return train(args)
    runtime_env, forwarded = job_runtime_env(_read_runtime_env(a.runtime_env, a.runtime_env_json), a.env_var, os.environ)
    client = _jobs_client(a.address)
    job = client.submit_job(entrypoint=entrypoint(a.python, args), runtime_env=runtime_env)
    if forwarded:
        print(f"forwarded from this environment (values not shown): {', '.join(forwarded)}")
    print(f"submitted {job}; follow with: ray job logs --address {a.address} --follow {job}")
    return wait_for_job(client, job) if a.wait else 0


if __name__ == "__main__":
    sys.exit(main())
