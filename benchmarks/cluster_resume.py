"""A clpipe run under `ray job submit` that survives its whole Ray cluster, on a real 2-node cluster
on this machine (cluster/local.py: a head and a second node, each a `ray start` with its own temp
dir, ports, raylet and node id; the second has the custom resource `node2`, which
configs/cluster_tiny.yaml's `ray.evaluate_resources` asks for, so every evaluation runs there).

    flock /tmp/clpipe-heavy.lock python -m benchmarks.cluster_resume --json

1. `ray job submit --working-dir .` the tiny 3-task run (its DeepSpeed config a relative JSON path).
2. While it runs, the same command is submitted again: refused by the run's lease, naming the holder.
3. While task 1 trains (a checkpoint of it is in the storage), every process of both nodes is killed
   (what `ray stop --force` does, but only to this cluster: `ray stop` would end every Ray of the host).
4. The cluster is started again (new node ids) and the same command submitted: the same run id, the
   ledger's stages are not run again, task 1 resumes from its last Ray Train checkpoint.
5. The same run, uninterrupted, into another storage folder: its accuracy matrix must be identical.

Prints one JSON line (with --json, only that) and writes it to benchmarks/results/cluster_resume.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cluster.local import RAY, LocalCluster, ray_env
from pipelines.config import load_config
from pipelines.run.ledger import LEDGER_FILE, Ledger, StageKey

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/cluster_tiny.yaml"  # relative: the job runs in Ray's copy of the working dir
RESULT = REPO / "benchmarks" / "results" / "cluster_resume.json"


def submit(cluster: LocalCluster, storage: Path, wait: bool, submission_id: str) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir .` of `clpipe run CONFIG --storage STORAGE` (waits for the
    job's end and returns its logs, or with `wait` False returns once it is submitted)."""
    command = [RAY, "job", "submit", "--address", cluster.dashboard, "--submission-id", submission_id,
               "--runtime-env", "cluster/runtime_env.yaml", "--working-dir", ".", *([] if wait else ["--no-wait"]),
               "--", sys.executable, "-m", "pipelines.cli", "run", CONFIG, "--storage", str(storage)]
    return subprocess.run(command, cwd=REPO, env=ray_env(), capture_output=True, text=True, timeout=900)


def job_logs(cluster: LocalCluster, submission_id: str) -> str:
    return subprocess.run([RAY, "job", "logs", submission_id, "--address", cluster.dashboard], env=ray_env(),
                          capture_output=True, text=True, timeout=120).stdout


def run_id_in(logs: str) -> str | None:
    """The run id the job's driver printed (`clpipe run <id>: ...`)."""
    lines = [line for line in logs.splitlines() if line.startswith("clpipe run ")]
    return lines[0].split()[2].rstrip(":") if lines else None


def wait_for(check, what: str, timeout_s: float = 600, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every_s)
    raise TimeoutError(f"waited {timeout_s:.0f}s for {what}")


def task1_training_checkpointed(run_dir: Path) -> bool:
    """Task 1's train stage is running (not in the ledger) and has a checkpoint in the storage."""
    ledger = run_dir / LEDGER_FILE
    if not ledger.exists() or "task1/train" in json.loads(ledger.read_text())["stages"]:
        return False
    return any((run_dir / "ray_train").glob("*-task1/checkpoint_*"))


def matrix(run_dir: Path) -> np.ndarray:
    return np.array(json.loads((run_dir / "report" / "summary.json").read_text())["matrices"]["oracle"], dtype=float)


def second_node(cluster: LocalCluster) -> tuple[int, str]:
    nodes = cluster.node_ids()
    return len(nodes), next(node for node, resources in nodes.items() if "node2" in resources)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print only the result line")
    args = parser.parse_args()
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    wall = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="clpipe-cluster-resume-"))
    storage, reference = root / "storage", root / "uninterrupted"
    run_id = load_config(REPO / CONFIG).run_id  # validated here, in this copy of the repository
    run_dir = storage / run_id
    cluster = LocalCluster(head_cpus=2, nodes=[{"num_cpus": 1, "resources": {"node2": 1}}])
    node2_ids, node_counts = set(), []
    try:
        cluster.start()
        count, node2 = second_node(cluster)
        node_counts.append(count)
        node2_ids.add(node2)
        say(f"cluster up: {count} nodes, node2 {node2[:12]}; submitting {CONFIG} (run {run_id})")
        first = submit(cluster, storage, wait=False, submission_id="first")
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
        wait_for(lambda: (run_dir / LEDGER_FILE).exists(), "the first job's driver to open the run")
        second = submit(cluster, storage, wait=True, submission_id="second")
        refused = [line for line in (second.stdout + second.stderr).splitlines() if "is being driven by" in line]
        say(f"second submission: {refused[0] if refused else 'NOT refused'}")
        first_id = wait_for(lambda: run_id_in(job_logs(cluster, "first")), "the first job's run id", 300, 1.0)
        wait_for(lambda: task1_training_checkpointed(run_dir), "task 1 training with a checkpoint")
        cluster.kill()
        killed_at = json.loads((run_dir / LEDGER_FILE).read_text())["stages"]
        say(f"killed the whole cluster while task 1 trained; ledger had {sorted(killed_at)}")

        cluster.start()
        count, node2 = second_node(cluster)
        node_counts.append(count)
        node2_ids.add(node2)
        again = submit(cluster, storage, wait=True, submission_id="again")
        assert "succeeded" in again.stdout, again.stdout[-3000:] + again.stderr[-2000:]
        again_id = run_id_in(again.stdout)
        say(f"resubmitted after the restart: run {again_id}")
        whole = submit(cluster, reference, wait=True, submission_id="uninterrupted")
        assert "succeeded" in whole.stdout, whole.stdout[-3000:] + whole.stderr[-2000:]
    finally:
        cluster.kill()

    ledger = Ledger.read(run_dir)
    on_node2 = sorted(str(key) for key, out in ledger.by_prefix("").items() if out.get("node_id") in node2_ids)
    result = {
        "nodes": min(node_counts),
        "run_ids": {"validated_here": run_id, "first_job": first_id, "after_restart": again_id},
        "same_run_id": first_id == again_id == run_id,
        "restarts": 1,
        "stages_done_before_the_kill": len(killed_at),
        "task1_resumed_from_step": ledger.outputs(StageKey("train", 1))["resumed_from"],
        "identical": bool(np.array_equal(matrix(run_dir), matrix(reference / run_id), equal_nan=True)),
        "matrix": [[None if np.isnan(v) else round(v, 2) for v in row] for row in matrix(run_dir)],
        "second_driver_refused": bool(refused),
        "refused_message": refused[0].strip() if refused else None,
        "stages_on_second_node": on_node2,
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    line = json.dumps(result)
    RESULT.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
