"""`bench.py launch`: every stage instance of the DVC pipeline as its own cluster job (SLURM) or local process, through
submitit, each in its own git worktree, outputs handed over through the DVC remote (docs/cluster.md).

Why not `dvc repro` or `dvc exp run --queue`: the queue runs on one machine, and two DVC processes in one repository
collide on its lock. So each job gets a git worktree of the launched commit under `.launch/worktrees/<stage>` (its own
`.dvc/tmp/lock`) and runs (pipelines/stage_job.py)
    dvc pull <upstream stages> -> dvc repro --single-item <stage> -> dvc push <stage>
after taking its upstream stages' dvc.lock entries from `.launch/locks/`; at the end it writes its own entry there. The
launcher merges those entries into this worktree's dvc.lock and `dvc pull`s them, so `dvc status` here is clean and
`dvc repro` finds nothing to do. The worktrees share one DVC cache (`.launch/cache`), and stay after their job: a
re-launched training stage finds its `last.pt` there and resumes.

The stages and their order come from DVC's own graph (`Repo.index.graph`); this module names no method. Dependencies:
SLURM holds each job until its upstream jobs end well (`--dependency=afterok:...`, `--kill-on-invalid-dep=yes`); the
local executor has no dependencies, so the launcher starts a stage's job once its upstream stages are done and the
machine has room for it (`LocalSlots`: GPUs of its own, at most --jobs at once, a measurement alone), and waits.

What is done is what DVC says: stages `dvc status` finds unchanged here (after taking in finished jobs' entries) are
skipped; their outputs are pushed first so jobs can pull them. Job states (`--status`) come from the state file each
job writes (`.launch/state/`) and, for a job that died without writing one, from the scheduler (sacct) or its process.
This module imports no torch: jobs start in a second.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import submitit
import yaml

from pipelines.discovery import REPO_ROOT
from pipelines.stage_job import (
    LOCK_FILE,
    POLL_SECONDS,
    Folder,
    LaunchError,
    lock_entries,
    merge_lock,
    read_json,
    run_dvc,
    run_stage,
    write_atomic,
)

LAUNCH_DIR = ".launch"
# the executors `--executor` takes, as submitit names them ("slurm", "local")
SLURM, ON_THIS_MACHINE = submitit.SlurmExecutor.name(), submitit.LocalExecutor.name()
EXECUTORS = (SLURM, ON_THIS_MACHINE)
STATES = ("pending", "running", "done", "failed")
# sbatch options the launcher sets for every job, and the launch option (if any) that sets each: `--slurm` may not
# give them again (sbatch would take whichever line comes last)
OWN_SBATCH = {"job-name": None, "time": "--time", "nodes": "--nodes", "ntasks-per-node": "--nodes",
              "gpus-per-node": "--gpus-per-job", "partition": "--partition", "dependency": None,
              "kill-on-invalid-dep": None, "output": None, "error": None, "open-mode": None, "array": None}
SLURM_FAILED = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE")



@dataclass(frozen=True)
class StageJob:
    """One stage instance of the pipeline: its DVC name, the stages it reads from, what its job asks for."""

    name: str
    upstream: tuple[str, ...]
    gpus: int  # training: torchrun's processes (--nproc); model work: 1; data and tables: 0
    cmd: str = ""  # the stage's command, as DVC resolved it

    @property
    def trains(self) -> bool:
        """A training stage: its command runs torchrun (`--nproc`), so it can span nodes."""
        return "--nproc" in self.cmd

    @property
    def times(self) -> bool:
        """A timing stage (`bench.py measure`): on this machine it runs alone, so no other job shares its CPU or GPU
        while it is timed."""
        return " measure " in f" {self.cmd} "


# --- the pipeline, as DVC sees it ------------------------------------------------------------------------------------


def pipeline(root: Path) -> list[StageJob]:
    """Every stage instance in dependency order (upstream first), read from DVC's index."""
    import networkx as nx
    from dvc.repo import Repo

    def name(stage) -> str:  # as `dvc` run at the root names it (DVC's `addressing` is relative to the cwd)
        where = Path(stage.dvcfile.path).resolve()
        return stage.name if where == root / "dvc.yaml" else f"{where.relative_to(root)}:{stage.name}"

    root = Path(root).resolve()
    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        order = list(reversed(list(nx.topological_sort(graph))))
        jobs = []
        for stage in order:
            if not stage.cmd:  # a `.dvc` file (imported data): nothing to run
                continue
            match = re.search(r"--nproc[ =](\d+)", stage.cmd)
            gpus = int(match.group(1)) if match else (1 if "--method" in stage.cmd else 0)
            upstream = tuple(sorted(name(up) for up in graph.successors(stage) if up.cmd))
            jobs.append(StageJob(name(stage), upstream, gpus, stage.cmd))
    return jobs


def _git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if out.returncode != 0:
        raise LaunchError(f"`git {' '.join(args)}` failed in {root}: {(out.stderr or out.stdout).strip()[:200]}")
    return out.stdout


# --- checks before anything is submitted -----------------------------------------------------------------------------


def check_executor(executor: str) -> None:
    if executor not in EXECUTORS:
        raise LaunchError(f"unknown executor '{executor}'; use --executor slurm (submit to a SLURM cluster) or "
                          "--executor local (run the jobs on this machine)")
    if executor == SLURM and not (shutil.which("sbatch") and shutil.which("srun")):
        raise LaunchError("no `sbatch`/`srun` on PATH: --executor slurm runs on a SLURM login node; use --executor "
                          "local on this machine")


def clean_commit(root: Path) -> str:
    """The commit jobs run; uncommitted changes would silently not reach them, so they stop the launch."""
    probe = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True, text=True)
    if probe.returncode != 0:
        raise LaunchError(f"{root} has no git commit; jobs check out the launched commit: `git init`, commit the "
                          "repository, then launch again")
    changed = [line[3:] for line in _git(root, "status", "--porcelain", "--untracked-files=all").splitlines()
               if line[3:].strip('"') != LOCK_FILE]
    if changed:
        names = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise LaunchError(f"uncommitted changes ({names}): jobs run the committed code only; commit or stash them, "
                          "then launch again")
    return probe.stdout.strip()


def check_remote(root: Path) -> str:
    """The default DVC remote's name: jobs push their outputs there, this worktree pulls them back."""
    out = run_dvc(root, "remote", "default", check=False)
    name = out.stdout.strip()
    if out.returncode != 0 or not name:
        raise LaunchError("no default DVC remote: jobs hand their outputs back through one; add a folder every node "
                          "can reach, e.g. `dvc remote add -d store /shared/uhrbench-dvc`, then launch again")
    return name


def check_tracking(uri: str | None, timeout: float = 5.0) -> str:
    """Every job logs to one MLflow server: the URI must be http(s) and answer its /health endpoint."""
    if not uri or not uri.startswith(("http://", "https://")):
        raise LaunchError(f"MLFLOW_TRACKING_URI is {uri or 'not set'}; jobs on other nodes must log to one MLflow "
                          "server: start `mlflow server` (docs/cluster.md) and export "
                          "MLFLOW_TRACKING_URI=http://<host>:5000")
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise LaunchError(f"cannot reach the MLflow server at {uri} ({reason}); start it (docs/cluster.md) or fix "
                          "MLFLOW_TRACKING_URI") from None
    return uri


def check_resources(jobs: list[StageJob], gpus_per_job: int | None) -> None:
    nproc = max((job.gpus for job in jobs), default=1)
    if gpus_per_job is not None and gpus_per_job != nproc:
        raise LaunchError(f"--gpus-per-job {gpus_per_job}, but the training stages run torchrun with --nproc {nproc}; "
                          f"set `train: {{nproc_per_node: {gpus_per_job}}}` in params.yaml, commit, and launch again")


def slurm_options(executor: str, options: tuple[str, ...] | list[str]) -> dict[str, str | bool]:
    """`--slurm KEY=VALUE` (or a bare `KEY` flag), repeatable: more sbatch options for every job (account, qos,
    constraint, cpus-per-task, mem), as `#SBATCH --KEY=VALUE` lines."""
    if options and executor != SLURM:
        raise LaunchError(f"--slurm {options[0]}: sbatch options apply to --executor slurm only; leave them out "
                          "with --executor local")
    parsed: dict[str, str | bool] = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip().lstrip("-").replace("_", "-")
        if not re.fullmatch(r"[a-z][a-z0-9-]*", key) or (sep and not value.strip()):
            raise LaunchError(f"--slurm {option!r} is not an sbatch option: write KEY=VALUE as sbatch spells its long "
                              "option, e.g. --slurm account=myproject --slurm cpus-per-task=16 --slurm mem=64G")
        if key in OWN_SBATCH:
            own = OWN_SBATCH[key]
            raise LaunchError(f"--slurm {option}: the launcher sets --{key} itself" + (f"; use launch's {own} option"
                                                                                     if own else ""))
        parsed[key] = value.strip() if sep else True
    return parsed


# --- the launcher ----------------------------------------------------------------------------------------------------


def collect(root: Path, where: Folder, jobs: list[StageJob]) -> list[str]:
    """Finished jobs' dvc.lock entries into this worktree's dvc.lock, their outputs pulled from the remote."""
    entries = {}
    for job in jobs:
        if where.lock(job.name).is_file():
            entries.update(yaml.safe_load(where.lock(job.name).read_text()) or {})
    mine = lock_entries(root / LOCK_FILE)
    new = {name: entry for name, entry in entries.items() if mine.get(name) != entry}
    if new:
        merge_lock(root / LOCK_FILE, new)
        run_dvc(root, "pull", *new)
    return list(new)


def done_stages(root: Path, jobs: list[StageJob]) -> set[str]:
    """The stages `dvc status` finds up to date in this worktree."""
    out = run_dvc(root, "status", "--json")
    changed = set(json.loads(out.stdout.strip() or "{}"))
    return {job.name for job in jobs if job.name not in changed}


def prepare_worktree(root: Path, where: Folder, stage: str, commit: str) -> Path:
    """The stage's own worktree at `commit`; an existing one is moved to it, keeping untracked outputs (last.pt)."""
    from dvc.config import Config

    path = where.worktree(stage)
    if (path / ".git").exists():
        _git(path, "checkout", "--quiet", "--force", "--detach", commit)
    else:
        _git(root, "worktree", "prune")
        _git(root, "worktree", "add", "--quiet", "--force", "--detach", str(path), commit)
    local = root / ".dvc" / "config.local"  # a remote added with --local lives only here
    if local.is_file():
        shutil.copy2(local, path / ".dvc" / "config.local")
    with Config(dvc_dir=str(path / ".dvc")).edit(Config.LEVELS[-1]) as conf:  # the worktree's config.local
        conf["cache"]["dir"] = str(where.cache.resolve())  # one cache for all jobs: an upstream output is stored once
        # and linked, not copied, into each job's worktree (a prepared dataset is GBs); outputs are only ever
        # written by `dvc repro` here, which unprotects persistent outputs (last.pt) before a stage runs
        conf["cache"]["type"] = "reflink,hardlink,copy"
    return path


def machine_gpus() -> list[int]:
    """The GPUs the local executor hands out, by index: CUDA_VISIBLE_DEVICES where set, else what nvidia-smi lists;
    none on a machine without an NVIDIA GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None and shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True)
        visible = ",".join(out.stdout.split()) if out.returncode == 0 else ""
    ids = [part.strip() for part in (visible or "").split(",") if part.strip()]
    if not all(part.isdigit() for part in ids):
        raise LaunchError(f"CUDA_VISIBLE_DEVICES={visible}: the local executor hands out GPUs by index; give indices "
                          "(e.g. 0,1) or unset it")
    return [int(part) for part in ids]


class LocalSlots:
    """What the local executor may start now: at most `jobs` jobs at once, each on GPUs of its own (a training job
    needs its `--nproc` GPUs free), and a timing job alone (nothing starts while it runs, it starts when nothing
    runs), so a measurement never shares the machine. On a machine without GPUs only `jobs` limits."""

    def __init__(self, gpus: list[int], jobs: int | None = None):
        self.free = list(gpus)
        self.has_gpus = bool(gpus)
        self.jobs = jobs or max(1, len(gpus))
        self.running: dict[str, tuple[list[int], bool]] = {}  # stage -> (its GPUs, a timing job)

    def check(self, stages: list[StageJob]) -> None:
        """Refuse a launch with a stage this machine can never run (it would wait forever)."""
        need = max((job for job in stages), key=lambda job: job.gpus, default=None)
        if self.has_gpus and need is not None and need.gpus > len(self.free):
            raise LaunchError(f"{need.name} needs {need.gpus} GPUs, this machine has {len(self.free)} "
                              f"({','.join(map(str, self.free))}); set `train: {{nproc_per_node: {len(self.free)}}}` "
                              "in params.yaml, commit, and launch again")

    def take(self, job: StageJob) -> list[int] | None:
        """The GPUs `job` runs on (empty: none needed, or a machine without GPUs) if it may start now, else None."""
        if any(times for _, times in self.running.values()) or (job.times and self.running):
            return None
        need = job.gpus if self.has_gpus else 0
        if len(self.running) >= self.jobs or need > len(self.free):
            return None
        gpus, self.free = self.free[:need], self.free[need:]
        self.running[job.name] = (gpus, job.times)
        return gpus

    def hold(self, stage: str) -> None:
        """A job of an earlier launch still running: it counts as a job (its GPUs are not known here)."""
        self.running[stage] = ([], False)

    def release(self, stage: str) -> None:
        gpus, _ = self.running.pop(stage, ([], False))
        self.free = sorted(self.free + gpus)


def _executor(executor: str, where: Folder, job: StageJob, partition: str | None, timeout_min: int,
              dependency: list[str], nodes: int = 1, extra: dict | None = None, gpus: list[int] | None = None):
    nodes = nodes if job.trains else 1  # one task per node: each runs torchrun with the job's GPUs
    if executor == ON_THIS_MACHINE:
        ex = submitit.LocalExecutor(folder=str(where.logs / "%j"))
        # CUDA_VISIBLE_DEVICES = the GPUs the slots gave this job (none: an empty list)
        ex.update_parameters(timeout_min=timeout_min, gpus_per_node=len(gpus or []), tasks_per_node=nodes,
                             **({"visible_gpus": tuple(gpus)} if gpus else {}))
        return ex
    ex = submitit.SlurmExecutor(folder=str(where.logs / "%j"))
    params = {"job_name": f"uhrbench:{job.name}", "time": timeout_min, "nodes": nodes, "ntasks_per_node": 1,
              # a job after a failed one ends, not waits
              "additional_parameters": {**(extra or {}), "kill-on-invalid-dep": "yes"}}
    if job.gpus:
        params["gpus_per_node"] = job.gpus
    if partition:
        params["partition"] = partition
    if dependency:
        params["dependency"] = "afterok:" + ":".join(dependency)
    ex.update_parameters(**params)
    return ex


def job_state(where: Folder, stage: str, live=None) -> str:
    """pending / running / done / failed, or '-' for a stage no job was launched for."""
    state = (read_json(where.state(stage)) or {}).get("state")
    if state in ("done", "failed"):
        return state
    record = read_json(where.record(stage))
    if record is None:
        return "done" if where.lock(stage).is_file() else "-"
    if live is not None:  # the launcher's own submitit job: it knows its process
        alive = live.state in ("RUNNING", "PENDING", "REQUEUED", "CONFIGURING", "COMPLETING", "UNKNOWN")
        return (state or "pending") if alive else "failed"
    if record["executor"] == SLURM:
        slurm = submitit.SlurmJob(folder=record["folder"], job_id=record["job_id"]).state.split(" ")[0]
        if slurm in SLURM_FAILED:
            return "failed"
        return "running" if slurm == "RUNNING" else (state or "pending")
    alive = record.get("host") == socket.gethostname() and _pid_alive(int(record["job_id"]))
    return (state or "running") if alive else "failed"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def launch(executor: str, partition: str | None = None, gpus_per_job: int | None = None, nodes: int = 1,
           timeout_min: int = 24 * 60, wait: bool | None = None, root: Path = REPO_ROOT,
           slurm: tuple[str, ...] = (), jobs_at_once: int | None = None) -> list[str]:
    """Submit a job for every stage instance DVC does not find done; returns the lines to print."""
    from tqdm import tqdm

    check_executor(executor)
    extra = slurm_options(executor, slurm)
    if jobs_at_once is not None and executor != ON_THIS_MACHINE:
        raise LaunchError(f"--jobs {jobs_at_once}: it limits the local executor; SLURM runs as many jobs as the "
                          "cluster gives (leave --jobs out with --executor slurm)")
    root = Path(root).resolve()
    commit = clean_commit(root)
    check_remote(root)
    jobs = pipeline(root)
    check_resources(jobs, gpus_per_job)
    slots = LocalSlots(machine_gpus(), jobs_at_once) if executor == ON_THIS_MACHINE else None
    if slots:
        slots.check(jobs)
    tracking = check_tracking(os.environ.get("MLFLOW_TRACKING_URI"))
    where = Folder(root / LAUNCH_DIR)
    # jobs unpickle `run_stage` from this repository, wherever the scheduler starts them (both executors pass the
    # environment on)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    by_name = {job.name: job for job in jobs}

    collect(root, where, jobs)
    done = done_stages(root, jobs)
    if done:  # what this worktree already has (earlier launches, local `dvc repro`) must be on the remote for the jobs
        run_dvc(root, "push", *sorted(done))
    mine = lock_entries(root / LOCK_FILE)
    for name in done:
        if mine.get(name):
            write_atomic(where.lock(name), yaml.safe_dump({name: mine[name]}, sort_keys=False))
    in_flight = {job.name for job in jobs if job.name not in done and job_state(where, job.name) in ("pending",
                                                                                                      "running")}
    todo = [job for job in jobs if job.name not in done and job.name not in in_flight]
    lines = [f"{len(done)} of {len(jobs)} stages done" + (f", {len(in_flight)} still running from an earlier launch"
                                                          if in_flight else "")]
    if not todo and not in_flight:
        return [*lines, "nothing to launch; `dvc status` here is clean"]
    for job in todo:
        for stale in (where.lock(job.name), where.state(job.name), where.record(job.name)):
            stale.unlink(missing_ok=True)
        prepare_worktree(root, where, job.name, commit)

    live: dict = {}

    def submit(job: StageJob, gpus: list[int] | None = None) -> None:
        after = [(read_json(where.record(up)) or {}).get("job_id") for up in job.upstream if up not in done]
        ex = _executor(executor, where, job, partition, timeout_min, [a for a in after if a], nodes, extra, gpus)
        submitted = ex.submit(run_stage, str(where.path), job.name, list(job.upstream), tracking, job.cmd)
        live[job.name] = submitted
        write_atomic(where.record(job.name), json.dumps({
            "stage": job.name, "job_id": str(submitted.job_id), "executor": executor, "host": socket.gethostname(),
            "folder": str(where.logs / "%j"), "log": str(submitted.paths.stderr), "commit": commit,
            "submitted": time.time()}))

    if executor == SLURM:
        for job in todo:  # upstream first: each job names its upstream jobs' ids
            submit(job)
        lines.append(f"submitted {len(todo)} jobs to SLURM; `python bench.py launch --status` follows them")
        if not wait:
            return [*lines, "when they are done, `python bench.py launch` again brings their outputs into this "
                            "worktree (or add --wait)"]

    waiting = {job.name for job in todo} | in_flight
    failed: set[str] = set()
    for name in in_flight if slots else ():
        slots.hold(name)
    with tqdm(total=len(waiting), desc="stages", unit="stage", file=sys.stderr) as bar:
        while waiting:
            for name in sorted(waiting):
                state = job_state(where, name, live.get(name))
                if name not in live and name not in in_flight and executor == ON_THIS_MACHINE:
                    ups = by_name[name].upstream
                    if any(up in failed for up in ups):
                        failed.add(name)  # never started: an upstream stage failed
                        waiting.discard(name)
                        bar.update()
                    elif all(up in done for up in ups) and (gpus := slots.take(by_name[name])) is not None:
                        submit(by_name[name], gpus)
                    continue
                if state in ("done", "failed"):
                    if slots:
                        slots.release(name)
                    (done if state == "done" else failed).add(name)
                    waiting.discard(name)
                    bar.set_postfix_str(f"{len(failed)} failed" if failed else "")
                    bar.update()
            time.sleep(POLL_SECONDS if waiting else 0)
    taken = collect(root, where, jobs)
    lines.append(f"{len(taken)} finished stages taken into dvc.lock and pulled")
    if failed:
        shown = ", ".join(sorted(failed)[:3]) + (" ..." if len(failed) > 3 else "")
        raise LaunchError(f"{len(failed)} stages failed or were not run ({shown}); `python bench.py launch --status` "
                          "names their logs; fix the cause and launch again (finished stages are kept)")
    return lines


def status(root: Path = REPO_ROOT) -> str:
    """`--status`: stage, job id, state and log of every stage instance, upstream first."""
    from tabulate import tabulate

    root = Path(root).resolve()
    where = Folder(root / LAUNCH_DIR)
    rows = []
    for job in pipeline(root):
        record = read_json(where.record(job.name)) or {}
        log = record.get("log", "")
        rows.append([job.name, record.get("job_id", "-"), job_state(where, job.name),
                     os.path.relpath(log, root) if log else "-"])
    return tabulate(rows, headers=["stage", "job", "state", "log"], tablefmt="simple")
