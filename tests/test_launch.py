"""`bench.py launch`: the DVC pipeline as one submitit job per stage instance, against a real `mlflow server` and a
local-folder DVC remote; `--status`; re-launching after a killed training job; every input that stops a launch."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipelines.launch import pipeline
from tests.test_pipeline_dvc import shrink

KILLED = "train_seed@synthetic-global-1"  # the job the first launch loses mid-training

# Python runs sitecustomize.py at start-up: in the one stage command named by KILL_STAGE (DVC sets DVC_STAGE for a
# stage's command), `bench.py train` SIGKILLs itself right after writing its first last.pt, as tests/kill_after.py
# does; a real kill at a chosen point, in a job the launcher started
KILL_HOOK = """
import os
if os.environ.get("KILL_STAGE") and os.environ.get("DVC_STAGE") == os.environ["KILL_STAGE"]:
    import signal, sys
    from pathlib import Path
    sys.path.insert(0, os.getcwd())
    from pipelines import train
    save = train.save_checkpoint
    def save_then_die(path, payload):
        save(path, payload)
        if Path(path).name == "last.pt":
            os.kill(os.getpid(), signal.SIGKILL)
    train.save_checkpoint = save_then_die
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def commit_all(repo: Path) -> None:
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "launch test")


def bench(repo: Path, env: dict, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench.py", *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 with a database backend and an artifact root, as docs/cluster.md starts."""
    port = free_port()
    server = tmp_path / "server"
    server.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{server / 'mlflow.db'}", "--artifacts-destination", str(server / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=open(server / "log", "w"), stderr=subprocess.STDOUT, cwd=server)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, (server / "log").read_text()[-2000:]
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start: " + (server / "log").read_text()[-2000:])
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def launch_repo(repo: Path, tmp_path: Path, local_remote: bool = True) -> Path:
    """The copied repository as a user launches it: a git commit, a DVC remote folder (added with --local, so the
    jobs' worktrees must get it from .dvc/config.local)."""
    (repo / "dvc.lock").unlink(missing_ok=True)  # whatever a local run left: the launch starts from nothing
    git(repo, "init", "-q")
    commit_all(repo)
    if local_remote:
        remote = tmp_path / "remote"
        subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "--local", "-d", "store", str(remote)],
                       cwd=repo, check=True, capture_output=True)
    return repo


def states(text: str) -> dict[str, tuple[str, str]]:
    """`--status` table -> {stage: (job, state)}."""
    rows = {}
    for line in text.splitlines()[2:]:
        parts = line.split()
        if len(parts) >= 3:
            rows[parts[0]] = (parts[1], parts[2])
    return rows


@pytest.mark.slow
def test_launch_local_end_to_end(copy_repo, tmp_path, mlflow_server):
    """2 methods x 1 dataset x 2 seeds through submitit's local executor: one job lost mid-training, `--status`
    names it, re-launching runs only what is not done and resumes that training; then every stage is done, every
    run is in the server and `dvc status` here is clean."""
    import mlflow

    repo = copy_repo
    shrink(repo / "params.yaml")
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["benchmark"].update(methods=["global", "local"], networks=[], extra_seeds=[1])
    raw["methods"]["global"]["recipes"]["smoke"].update(iterations=3, checkpoint_every=1)  # a last.pt to resume from
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    launch_repo(repo, tmp_path)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    # no GPUs for the jobs, on any machine: --jobs alone says how many run at once
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server, PYTHONPATH=str(hook), KILL_STAGE=KILLED,
               CUDA_VISIBLE_DEVICES="")

    first = bench(repo, env, "launch", "--executor", "local", "--jobs", "2")
    assert first.returncode == 1, first.stdout + first.stderr
    assert "failed or were not run" in first.stderr and KILLED in first.stderr
    table = states(bench(repo, env, "launch", "--status").stdout)
    stages = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], cwd=repo, check=True,
                            capture_output=True, text=True).stdout.split()
    assert set(table) == set(stages) and len(stages) == 12  # prepare, 2 x (train, evaluate, measure), 2 x seed, report
    assert table[KILLED][1] == "failed"
    assert table["evaluate_seed@synthetic-global-1"] == ("-", "-") and table["report"] == ("-", "-")  # never started
    assert {state for name, (_, state) in table.items() if name not in
            (KILLED, "evaluate_seed@synthetic-global-1", "report")} == {"done"}
    worktree = repo / ".launch" / "worktrees" / KILLED
    assert (worktree / "checkpoints" / "synthetic" / "global@seed1" / "last.pt").is_file()

    env.pop("KILL_STAGE")
    second = bench(repo, env, "launch", "--executor", "local", "--jobs", "2")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "9 of 12 stages done" in second.stdout
    table = states(bench(repo, env, "launch", "--status").stdout)
    assert {state for _, state in table.values()} == {"done"}
    log = Path(json.loads((repo / ".launch" / "jobs" / f"{KILLED}.json").read_text())["log"])
    assert f"resuming from {worktree / 'checkpoints' / 'synthetic' / 'global@seed1' / 'last.pt'}" in log.read_text()

    # every job started after the jobs it depends on had finished
    def state(name):
        return json.loads((repo / ".launch" / "state" / f"{name}.json").read_text())
    jobs = pipeline(repo)
    for job in jobs:
        assert all(state(job.name)["started"] >= state(up)["finished"] for up in job.upstream), job.name
    # --jobs 2: two jobs ran at once, but never beside a measurement
    spans = {job.name: (state(job.name)["started"], state(job.name)["finished"]) for job in jobs}

    def overlap(a, b):
        return a != b and spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]
    assert any(overlap(a, b) for a in spans for b in spans)
    timed = [job.name for job in jobs if job.times]
    assert len(timed) == 2 and not any(overlap(a, b) for a in timed for b in spans)
    name, upstream = jobs[-1].name, jobs[-1].upstream
    assert len(upstream) == 6 and name == "report"  # the last stage reads every evaluation and measurement

    # here: dvc.lock holds every stage, the outputs came from the remote, nothing to reproduce
    out = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0 and "up to date" in out.stdout, out.stdout + out.stderr
    assert set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]) == set(stages)
    summary = json.loads((repo / "results" / "summary.json").read_text())
    assert set(summary["synthetic"]) >= {"global", "local"}
    assert git(repo, "status", "--porcelain", "--untracked-files=all").strip() in ("", "?? dvc.lock")
    third = bench(repo, env, "launch", "--executor", "local")
    assert third.returncode == 0 and "nothing to launch" in third.stdout, third.stdout + third.stderr

    # every run is in the one server
    mlflow.set_tracking_uri(mlflow_server)
    runs = mlflow.search_runs(experiment_names=["uhrbench-synthetic"])
    tracked = {name for name in stages if name.split("@")[0] in ("train", "evaluate", "measure", "train_seed",
                                                                  "evaluate_seed")}
    assert set(runs["tags.dvc_stage"]) == tracked
    assert (runs["status"] == "FINISHED").all()
    resumed = runs[runs["tags.dvc_stage"] == KILLED]
    assert resumed["tags.resumed_at"].notna().any()


@pytest.mark.slow
def test_launch_local_training_on_two_nodes(copy_repo, tmp_path, mlflow_server):
    """`--nodes 2` with the local executor: the training job runs two tasks, each a torchrun "node" joining one
    rendezvous (the path a multi-node SLURM job takes, on this machine); the model trains on a world of 2."""
    import mlflow

    repo = copy_repo
    shrink(repo / "params.yaml")
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["benchmark"].update(methods=["global"], networks=[], extra_seeds=[])
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    launch_repo(repo, tmp_path)
    # on CPU (gloo) on any machine: both local "nodes" of one job would otherwise be given the same GPU
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server, CUDA_VISIBLE_DEVICES="")
    out = bench(repo, env, "launch", "--executor", "local", "--nodes", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert {state for _, state in states(bench(repo, env, "launch", "--status").stdout).values()} == {"done"}
    mlflow.set_tracking_uri(mlflow_server)
    runs = mlflow.search_runs(experiment_names=["uhrbench-synthetic"], filter_string="tags.stage = 'train'")
    assert list(runs["params.world_size"]) == ["2"]  # one process per node, one model
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=repo, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout + status.stderr


# --- inputs that stop a launch: one line naming the fix -------------------------------------------------------------


@pytest.fixture
def small_repo(copy_repo, tmp_path):
    return launch_repo(copy_repo, tmp_path)


def one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_unknown_executor(small_repo, tmp_path):
    line = one_line(bench(small_repo, dict(os.environ), "launch", "--executor", "pbs"))
    assert "unknown executor 'pbs'" in line and "--executor slurm" in line and "--executor local" in line


def test_dirty_tree(small_repo):
    with open(small_repo / "params.yaml", "a") as handle:
        handle.write("\n# edited\n")
    (small_repo / "notes.txt").write_text("x")
    line = one_line(bench(small_repo, dict(os.environ), "launch", "--executor", "local"))
    assert "uncommitted changes" in line and "params.yaml" in line and "notes.txt" in line and "commit" in line


def test_dvc_lock_is_not_a_change(small_repo):
    """The launcher writes dvc.lock here itself: a changed one must not stop the next launch (the next check does)."""
    (small_repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    line = one_line(bench(small_repo, dict(os.environ, MLFLOW_TRACKING_URI=""), "launch", "--executor", "local"))
    assert "MLFLOW_TRACKING_URI" in line


def test_no_git_commit(copy_repo):
    line = one_line(bench(copy_repo, dict(os.environ), "launch", "--executor", "local"))
    assert "no git commit" in line


def test_no_remote(copy_repo, tmp_path):
    repo = launch_repo(copy_repo, tmp_path, local_remote=False)
    line = one_line(bench(repo, dict(os.environ), "launch", "--executor", "local"))
    assert "no default DVC remote" in line and "dvc remote add -d" in line


@pytest.mark.parametrize("uri, expect", [("", "not set"), ("sqlite:///x.db", "one MLflow server"),
                                         ("http://127.0.0.1:{port}", "cannot reach the MLflow server")])
def test_tracking_server(small_repo, uri, expect):
    line = one_line(bench(small_repo, dict(os.environ, MLFLOW_TRACKING_URI=uri.format(port=free_port())), "launch",
                          "--executor", "local"))
    assert expect in line and ("mlflow server" in line or "MLFLOW_TRACKING_URI" in line)


def test_no_slurm_here(small_repo):
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + "/usr/bin:/bin")
    line = one_line(bench(small_repo, env, "launch", "--executor", "slurm"))
    assert "no `sbatch`" in line and "--executor local" in line


def test_resources(small_repo):
    env = dict(os.environ)
    line = one_line(bench(small_repo, env, "launch", "--executor", "local", "--gpus-per-job", "4"))
    assert "--nproc 1" in line and "nproc_per_node: 4" in line
    assert not (small_repo / ".launch" / "jobs").exists()  # nothing was submitted


def test_slurm_submission(small_repo, mlflow_server, tmp_path):
    """Through a stand-in `sbatch`: one job per stage instance, upstream first, each held by `afterok` on exactly
    its upstream jobs, the GPUs its stage needs, the partition and time asked for; `--status` asks sacct."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\nn=$(ls "$0.d" 2>/dev/null | wc -l); mkdir -p "$0.d"\n'
                                    'cp "$1" "$0.d/$((n + 100))"\necho "Submitted batch job $((n + 100))"\n')
    (bin_dir / "sacct").write_text("#!/bin/sh\necho 'JobID|State|NodeList'\n"
                                   "for id in $(seq 100 140); do echo \"$id|PENDING|None\"; done\n")
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    for name in ("sbatch", "sacct", "srun"):
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = bench(small_repo, env, "launch", "--executor", "slurm", "--partition", "gpu", "--time", "90", "--nodes", "2",
                "--slurm", "account=uhr-proj", "--slurm", "cpus_per_task=8", "--slurm", "exclusive")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 of 20 stages done" in out.stdout and "submitted 20 jobs to SLURM" in out.stdout
    records = {}
    for path in (small_repo / ".launch" / "jobs").glob("*.json"):
        record = json.loads(path.read_text())
        records[record["stage"]] = record
    scripts = {name: (bin_dir / "sbatch.d" / record["job_id"]).read_text() for name, record in records.items()}
    assert all("#SBATCH --partition=gpu" in s and "#SBATCH --time=90" in s and "--kill-on-invalid-dep=yes" in s
               for s in scripts.values())
    assert "--gpus-per-node" not in scripts["prepare@synthetic"] + scripts["report"]  # data and tables: no GPU
    assert "#SBATCH --gpus-per-node=1" in scripts["train@synthetic-global"]  # torchrun --nproc 1
    # --nodes 2: training jobs span two nodes, one task (one torchrun) each; the others stay on one node
    assert all(("#SBATCH --nodes=2" in script) == name.startswith("train") for name, script in scripts.items())
    assert all("#SBATCH --ntasks-per-node=1" in script for script in scripts.values())
    # --slurm: more sbatch options on every job, spelt as sbatch spells them
    assert all("#SBATCH --account=uhr-proj\n" in s and "#SBATCH --cpus-per-task=8\n" in s and "#SBATCH --exclusive\n"
               in s for s in scripts.values())

    def after(script: str) -> list[str]:
        return sorted(script.split("--dependency=afterok:")[1].split("\n")[0].split(":")) if "afterok" in script \
            else []

    ids = {name: record["job_id"] for name, record in records.items()}
    for job in pipeline(small_repo):  # submitted upstream first, so every upstream id is known when a job is submitted
        assert after(scripts[job.name]) == sorted(ids[up] for up in job.upstream), job.name
        assert all(int(ids[up]) < int(ids[job.name]) for up in job.upstream)
    assert len(after(scripts["report"])) == 12  # every evaluation and measurement
    table = states(bench(small_repo, env, "launch", "--status").stdout)
    assert table["report"] == (records["report"]["job_id"], "pending")
    # launching again while they wait submits nothing twice
    again = bench(small_repo, env, "launch", "--executor", "slurm")
    assert again.returncode == 0 and "20 still running" in again.stdout, again.stdout + again.stderr
    assert len(list((bin_dir / "sbatch.d").iterdir())) == 20


@pytest.mark.parametrize("executor, option, expect", [
    ("slurm", "time=30", "sets --time itself; use launch's --time option"),
    ("slurm", "gpus_per_node=2", "use launch's --gpus-per-job option"),
    ("slurm", "dependency=afterany:1", "the launcher sets --dependency itself"),
    ("slurm", "mem=", "is not an sbatch option"),
    ("slurm", "=64G", "is not an sbatch option"),
    ("local", "account=p", "apply to --executor slurm only")])
def test_bad_slurm_option(small_repo, tmp_path, executor, option, expect):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "srun"):  # never called: the option is refused before anything is submitted
        (bin_dir / name).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    line = one_line(bench(small_repo, env, "launch", "--executor", executor, "--slurm", option))
    assert expect in line and option in line
    assert not (small_repo / ".launch" / "jobs").exists()


def test_local_slots():
    """The local executor's scheduling: GPUs of its own for each job, at most --jobs at once, a measurement alone."""
    from pipelines.launch import LocalSlots, StageJob

    def job(name, gpus, cmd=""):
        return StageJob(name, (), gpus, cmd)
    train_a, train_b, train_c = (job(f"train@{x}", 1, "bench.py train --nproc 1") for x in "abc")
    measure, prepare = job("measure@a", 1, "python bench.py measure --method a"), job("prepare@d", 0)
    slots = LocalSlots([2, 5])  # CUDA_VISIBLE_DEVICES=2,5: one job per GPU by default
    assert (slots.take(train_a), slots.take(train_b), slots.take(train_c)) == ([2], [5], None)
    slots.release(train_a.name)
    assert slots.take(measure) is None  # train@b still runs
    assert slots.take(train_c) == [2]
    slots.release(train_b.name), slots.release(train_c.name)
    assert slots.take(measure) == [2]
    assert slots.take(prepare) is None and slots.take(train_a) is None  # nothing beside a measurement
    slots.release(measure.name)
    assert slots.take(prepare) == [] and slots.take(train_a) == [2]
    cpu = LocalSlots([], jobs=2)  # no GPU: --jobs alone limits, and no job is given a GPU
    assert (cpu.take(train_a), cpu.take(train_b), cpu.take(train_c)) == ([], [], None)
    assert LocalSlots([]).take(train_a) == [] and LocalSlots([]).jobs == 1
    with pytest.raises(ValueError, match="needs 2 GPUs, this machine has 1"):
        LocalSlots([0]).check([job("train@x", 2, "--nproc 2")])


@pytest.mark.parametrize("visible, args, expect", [
    ("0", ("--executor", "local", "--jobs", "1"),
     "needs 2 GPUs, this machine has 1 (0); set `train: {nproc_per_node: 1}`"),
    ("GPU-5c1e", ("--executor", "local"), "CUDA_VISIBLE_DEVICES=GPU-5c1e: the local executor hands out GPUs by "
                                          "index"),
    ("0,1", ("--executor", "slurm", "--jobs", "2"), "--jobs 2: it limits the local executor")])
def test_local_gpus(copy_repo, tmp_path, visible, args, expect):
    raw = yaml.safe_load((copy_repo / "params.yaml").read_text())
    raw.setdefault("train", {})["nproc_per_node"] = 2
    (copy_repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    repo = launch_repo(copy_repo, tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "srun"):  # never called: the launch is refused before anything is submitted
        (bin_dir / name).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=visible,
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    line = one_line(bench(repo, env, "launch", *args))
    assert expect in line
    assert not (repo / ".launch" / "jobs").exists()


def test_status_before_any_launch(small_repo):
    out = bench(small_repo, dict(os.environ), "launch", "--status")
    assert out.returncode == 0, out.stderr
    table = states(out.stdout)
    assert "report" in table and all(row == ("-", "-") for row in table.values())
    assert out.stdout.splitlines()[0].split() == ["stage", "job", "state", "log"]
