"""Kill the driver at random moments of a run and check that nothing is lost or duplicated.

    python -m benchmarks.chaos --json [--kills 5] [--seed 0]

Runs a 3-task tiny sequence once straight through (the reference), then again in a fresh
storage folder where the driver is SIGKILLed (with the local Ray it started) at `--kills`
moments drawn at random from: during prepare, during the evaluation of a task before its
training, mid-train, during the bank write, during eval.
After each kill the same command is run again. At the end it compares the final accuracy
matrix and the MLflow runs with the reference and prints on its last line
{"kills": N, "identical": true|false, "duplicate_mlflow_runs": k, "lost_stages": k, "extension": {…}}:
lost stages are stages the ledger had marked done before a kill and not after it.

The extension case: the first two tasks run to the end, then the config with the third task
appended runs once uninterrupted (on a copy) and once with the driver killed at
`--extension-kills` moments of the new task's stages. Its result: kills, lost stages, duplicate
MLflow runs, `identical` (to the uninterrupted extension) and `identical_to_scratch` (to the
3-task reference run; expected wherever training is deterministic, as it is here).
`--only-extension` skips the kills of the 3-task run from scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

MOMENTS = ("prepare", "before", "train", "bank", "evaluate")


def chaos_config(tasks: int = 3) -> dict:
    return {
        "name": "chaos",
        "model": {"kind": "tiny", "hidden_size": 64, "num_layers": 2, "vocab_size": 256},
        "tasks": [{"name": f"task{t}", "data": {"synthetic": {"n_train": 48, "n_test": 24}},
                   "labels": [f"w{2 * t + 1}", f"w{2 * t + 2}"]} for t in range(tasks)],
        "method": {"name": "moe_cl", "params": {"adv_weight": 0.1}},
        "training": {"epochs": 6, "lr": 0.01, "batch_size": 8, "max_length": 32, "checkpoint_every": 3},
        "ray": {"num_workers": 1, "cpus_per_worker": 1},
    }


def driver(config: Path, storage: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(config), "--storage", str(storage)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)  # its own process group: the local Ray dies with it


def done_stages(run_dir: Path) -> set[str]:
    from pipelines.run.ledger import LEDGER_FILE, Ledger

    return {str(key) for key in Ledger.read(run_dir).by_prefix("")} if (run_dir / LEDGER_FILE).exists() else set()


def run_to_end(config: Path, storage: Path) -> None:
    proc = driver(config, storage)
    proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"clpipe run failed with exit code {proc.returncode}")


def stage_order(tasks: int) -> list[str]:
    """Stage keys in the order the driver runs them."""
    per_task = [[*(["before"] if t else []), "train", "bank", "evaluate"] for t in range(tasks)]  # task 0 has no "before"
    return ["model", *[f"task{t}/prepare" for t in range(tasks)], "baseline/evaluate",
            *[f"task{t}/{s}" for t in range(tasks) for s in per_task[t]]]


def kill_plan(kills: int, tasks: int, rng: random.Random) -> list[str]:
    """`kills` distinct stages to kill the driver in, at least one of each moment kind, in run order."""
    order = stage_order(tasks)
    by_kind = {m: [k for k in order if k.endswith("/" + m) and not k.startswith("baseline")] for m in MOMENTS}
    plan = {rng.choice(by_kind[m]) for m in MOMENTS[:kills]}
    plan |= set(rng.sample([k for k in order if k not in plan], max(0, kills - len(plan))))
    return sorted(plan, key=order.index)


def run_and_kill(config: Path, storage: Path, run_dir: Path, stage: str, rng: random.Random) -> tuple[bool, int]:
    """Start the driver, SIGKILL it once `stage` starts (plus a random delay). Returns (killed, stages lost)."""
    before = done_stages(run_dir)
    proc = driver(config, storage)
    killed = False
    for line in proc.stdout:
        if line.split() == [stage, "running"]:
            time.sleep(rng.uniform(0.0, 3.0 if stage.endswith("train") else 0.3))
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
    proc.wait()
    return killed, len(before - done_stages(run_dir))


def mlflow_duplicates(storage: Path) -> int:
    from mlflow import MlflowClient

    from pipelines.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri(storage))
    runs = client.search_runs([client.get_experiment_by_name("clpipe").experiment_id], max_results=1000)
    keys = Counter(r.data.tags.get("clpipe.stage") or r.data.tags.get("clpipe.kind") for r in runs)
    return sum(n - 1 for n in keys.values())


def matrix(run_dir: Path) -> list:
    return json.loads((run_dir / "report" / "summary.json").read_text())["matrices"]


def kill_each(config: Path, storage: Path, run_dir: Path, plan: list[str], rng: random.Random, say) -> tuple[int, int]:
    """Run with a kill during each stage of `plan` in turn; returns (kills, stages lost)."""
    kills = lost = 0
    for stage in plan:
        killed, lost_now = run_and_kill(config, storage, run_dir, stage, rng)
        kills += killed
        lost += lost_now
        say(f"kill during {stage}: {'killed' if killed else 'not reached'}; "
            f"stages done so far {len(done_stages(run_dir))}")
    return kills, lost


def extension_case(work: Path, run_id: str, kills: int, rng: random.Random, say) -> dict:
    """A finished 2-task run extended to 3 tasks: uninterrupted on a copy, and with kills."""
    two, three = work / "two.yaml", work / "chaos.yaml"
    two.write_text(yaml.safe_dump(chaos_config(2)))
    storage, uninterrupted = work / "extension", work / "extension-uninterrupted"
    run_to_end(two, storage)
    shutil.copytree(storage, uninterrupted)
    run_to_end(three, uninterrupted)
    say("2-task run and its uninterrupted extension done")
    new_stages = ["task2/prepare", "baseline/evaluate-from-task2", "task2/before", "task2/train", "task2/bank",
                  "task2/evaluate"]
    plan = sorted(rng.sample(new_stages, min(kills, len(new_stages))), key=new_stages.index)
    killed, lost = kill_each(three, storage, storage / run_id, plan, rng, say)
    run_to_end(three, storage)
    final = matrix(storage / run_id)
    return {"kills": killed, "identical": final == matrix(uninterrupted / run_id),
            "identical_to_scratch": final == matrix(work / "reference" / run_id),
            "duplicate_mlflow_runs": mlflow_duplicates(storage), "lost_stages": lost}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extension-kills", type=int, default=3)
    parser.add_argument("--only-extension", action="store_true", help="skip the kills of the run from scratch")
    parser.add_argument("--json", action="store_true", help="print only the result line")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="clpipe-chaos-"))
    config = work / "chaos.yaml"
    config.write_text(yaml.safe_dump(chaos_config()))
    from pipelines.config import load_config

    run_id = load_config(config).run_id
    say = (lambda *_: None) if args.json else print

    run_to_end(config, work / "reference")
    say("reference run done")
    result = {}
    if not args.only_extension:
        storage = work / "chaos"
        kills, lost = kill_each(config, storage, storage / run_id, kill_plan(args.kills, 3, rng), rng, say)
        run_to_end(config, storage)
        result = {"kills": kills, "identical": matrix(work / "reference" / run_id) == matrix(storage / run_id),
                  "duplicate_mlflow_runs": mlflow_duplicates(storage), "lost_stages": lost}
    result["extension"] = extension_case(work, run_id, args.extension_kills, rng, say)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
