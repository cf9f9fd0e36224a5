"""One stage instance's job, as `bench.py launch` submits it (pipelines/launch.py): what runs on the node.

In the stage's own git worktree under `.launch/worktrees/<stage>`: take the upstream stages' dvc.lock entries from
`.launch/locks/`, `dvc pull` their outputs, `dvc repro --single-item <stage>`, `dvc push` its outputs, and write its
own entry and its state (`.launch/state/`) for the launcher. A multi-node training job runs this on every node: the
first does the DVC work and hosts torchrun's rendezvous, the others join it. Imports no torch: a job starts in a
second.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import submitit
import yaml

POLL_SECONDS = 1.0
LOCK_FILE = "dvc.lock"  # the launcher itself writes it in the checkout, so it never counts as an uncommitted change


class LaunchError(ValueError):
    """A launch that cannot start (wrong option, dirty tree, no remote, no tracking server); one line naming the fix."""



def run_dvc(cwd: Path, *args: str, check: bool = True, quiet: bool = True) -> subprocess.CompletedProcess:
    """DVC as a subprocess of this interpreter (its own process and lock). quiet: output kept for the error line;
    otherwise it goes to this process's output (a job's log)."""
    # not quiet: all of it into the job's stderr log, with the stage's own output and any traceback
    streams = {"capture_output": True} if quiet else {"stdout": sys.stderr.fileno(), "stderr": subprocess.STDOUT}
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, text=True, **streams)
    if check and out.returncode != 0:
        tail = ((out.stdout or "") + (out.stderr or "")).strip().splitlines()[-1:]
        raise LaunchError(f"`dvc {' '.join(args)}` failed in {cwd} (exit {out.returncode})"
                          + (f": {tail[0].strip()}" if tail else "; its output is in the job's log"))
    return out


# --- the launch folder -----------------------------------------------------------------------------------------------


def _safe(stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9@._-]", "_", stage)


@dataclass(frozen=True)
class Folder:
    """`.launch/`: job records, state files, lock entries, logs, worktrees and the shared DVC cache."""

    path: Path

    def record(self, stage: str) -> Path:
        return self.path / "jobs" / f"{_safe(stage)}.json"

    def state(self, stage: str) -> Path:
        return self.path / "state" / f"{_safe(stage)}.json"

    def lock(self, stage: str) -> Path:
        return self.path / "locks" / f"{_safe(stage)}.yaml"

    def worktree(self, stage: str) -> Path:
        return self.path / "worktrees" / _safe(stage)

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def cache(self) -> Path:
        return self.path / "cache"


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_atomic(path: Path, text: str) -> None:
    """Atomic: a reader (the launcher, `--status`) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def lock_entries(lock: Path) -> dict:
    raw = yaml.safe_load(lock.read_text()) if lock.is_file() else None
    return dict((raw or {}).get("stages") or {})


def merge_lock(lock: Path, entries: dict) -> None:
    """Put other stages' dvc.lock entries into a dvc.lock (DVC reads it as written by `dvc repro`)."""
    raw = (yaml.safe_load(lock.read_text()) if lock.is_file() else None) or {}
    raw.setdefault("schema", "2.0")
    raw["stages"] = {**(raw.get("stages") or {}), **entries}
    write_atomic(lock, yaml.safe_dump(raw, sort_keys=False))


# --- one job ---------------------------------------------------------------------------------------------------------


RENDEZVOUS_TIMEOUT_S = 3600  # the other nodes wait this long for the first one (it pulls the data first)


def node_group() -> tuple[int, int, str, str]:
    """(this task's rank, number of tasks, the first task's host, job id) of the running submitit job; a multi-node
    training job has one task per node. (0, 1, "", "") outside a job."""
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:
        return 0, 1, "", ""
    # the local executor's tasks are "nodes" on this machine (--nodes with --executor local tries the path)
    host = env.hostnames[0] if env.num_nodes > 1 else "127.0.0.1"
    return env.global_rank, env.num_tasks, host, str(env.job_id)


def join_rendezvous(rank: int, nodes: int, host: str, job_id: str) -> None:
    """Point this node's torchrun at one rendezvous on the first node: `bench.py train` runs torchrun, which reads
    its --nnodes / --rdzv-* options from these PET_* variables (torch.distributed.run)."""
    port = 29500 + int(re.sub(r"\D", "", job_id) or 0) % 1000  # two jobs sharing a first node get two ports
    os.environ.update(PET_NNODES=str(nodes), PET_RDZV_BACKEND="c10d", PET_RDZV_ENDPOINT=f"{host}:{port}",
                      PET_RDZV_ID=job_id, PET_RDZV_CONF=f"is_host={int(rank == 0)},join_timeout="
                      f"{RENDEZVOUS_TIMEOUT_S},read_timeout={RENDEZVOUS_TIMEOUT_S}")


def follow(stage: str, command: str, worktree: Path, state: Path) -> str:
    """Another node of a multi-node training: the stage's command in the first node's worktree, stopped when the
    first node's job fails (its torchrun would otherwise wait for a rendezvous that never comes)."""
    proc = subprocess.Popen(command, shell=True, cwd=worktree)
    while proc.poll() is None:
        if (read_json(state) or {}).get("state") == "failed":
            proc.terminate()
            proc.wait()
            raise LaunchError(f"{stage}: the first node's job failed; this node stopped")
        time.sleep(POLL_SECONDS)
    if proc.returncode:
        raise LaunchError(f"{stage}: `{command}` failed on this node (exit {proc.returncode})")
    return stage


def run_stage(folder: str, stage: str, upstream: list[str], tracking: str, command: str = "") -> str:
    """The job: in the stage's worktree, pull the upstream outputs, reproduce this one stage, push its outputs and
    hand its dvc.lock entry to the launcher. Any failure is written to the state file before it propagates.

    A training job on several nodes runs this once per node: the first node does all of the above, its `dvc repro`
    starting torchrun as the rendezvous host; every other node runs the stage's `command` in the same worktree (on
    shared storage), whose torchrun joins that rendezvous, and writes no state."""
    where = Folder(Path(folder))
    worktree = where.worktree(stage)
    # the interpreter that launched runs the stage's `python bench.py ...`; every run logs to the one server
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking
    rank, nodes, host, job_id = node_group()
    if nodes > 1:
        join_rendezvous(rank, nodes, host, job_id)
        if rank > 0:
            return follow(stage, command, worktree, where.state(stage))
    state = where.state(stage)
    started = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    write_atomic(state, json.dumps({"state": "running", **started}))
    try:
        entries = {name: (yaml.safe_load(where.lock(name).read_text()) or {}).get(name) for name in upstream}
        missing = [name for name, entry in entries.items() if not entry]
        if missing:
            raise LaunchError(f"upstream stage {missing[0]} is not done (no {where.lock(missing[0])})")
        merge_lock(worktree / LOCK_FILE, entries)
        if upstream:
            run_dvc(worktree, "pull", *upstream, quiet=False)
        run_dvc(worktree, "repro", "--single-item", stage, quiet=False)
        run_dvc(worktree, "push", stage, quiet=False)
        entry = lock_entries(worktree / LOCK_FILE).get(stage)
        if not entry:
            raise LaunchError(f"`dvc repro` left no entry for {stage} in {worktree / LOCK_FILE}")
        write_atomic(where.lock(stage), yaml.safe_dump({stage: entry}, sort_keys=False))
        write_atomic(state, json.dumps({"state": "done", **started, "finished": time.time()}))
        return stage
    except BaseException as exc:
        error = str(exc).splitlines()[0][:300] if str(exc) else exc.__class__.__name__
        write_atomic(state, json.dumps({"state": "failed", **started, "error": error, "finished": time.time()}))
        raise


