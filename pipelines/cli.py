"""`clpipe`: run, resume, inspect and search continual-learning task sequences.

    clpipe run run.yaml [key=value ...] [--storage DIR]   run or resume (same command) a task sequence
    clpipe validate run.yaml [key=value ...]   check a config and its data, run nothing
    clpipe status RUN_ID [--storage DIR]       stage states and the accuracy matrix so far
    clpipe ui [RUN_ID] [--storage DIR] [--port 5000]   the MLflow UI on the run store, on 127.0.0.1
    clpipe tune run.yaml search.yaml [key=value ...] [--storage DIR]
    clpipe predict RUN_ID --input texts.jsonl [--task NAME] [--bank-of TASK] [--out preds.jsonl]
    clpipe serve RUN_ID [--port 8000] [--host 127.0.0.1] [--replicas N] [limits]   HTTP predictions on Ray Serve
    clpipe export RUN_ID --to DIR [--bank-of TASK] [--task NAME]   a LoRA bank as a PEFT adapter folder

key=value after a config sets a dotted path of it before validation (training.lr=5e-4,
method.params.adv_weight=0.2, tasks.0.max_train_examples=64; values are YAML scalars).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

DEFAULT_STORAGE = "runs"


def _storage(args) -> Path:
    return Path(args.storage).expanduser().resolve()


def _load(args):
    """The run config with the command line's key=value overrides."""
    from pipelines.overrides import load_config, parse_overrides

    return load_config(args.config, parse_overrides(args.overrides))


def cmd_validate(args) -> int:
    from pipelines.run.driver import check_data

    cfg = _load(args)
    check_data(cfg)
    print(f"{args.config}: valid; run id {cfg.run_id}; {len(cfg.tasks)} tasks; method {cfg.method.name}")
    return 0


def cmd_run(args) -> int:
    from pipelines.run.driver import Driver
    from pipelines.run.progress import ProgressBoard
    from pipelines.run.results import print_result
    from pipelines.run.sequence import task_records

    cfg = _load(args)
    storage = _storage(args)
    if _finished(storage / cfg.run_id, task_records(cfg)):
        print(f"{cfg.run_id}: already finished; results in {storage / cfg.run_id / 'report'}")
        return 0
    board = ProgressBoard(storage / cfg.run_id)  # progress of the running stages on this console
    try:
        result = Driver(cfg, storage, board.message, board=board).run()  # appended tasks continue the run
    finally:
        board.close()
    print_result(result)
    return 0


def _finished(run_dir: Path, tasks: list[dict]) -> bool:
    """Report written for exactly these tasks and MLflow complete (else the Driver goes through the
    ledger: it refuses a changed task, trains appended ones and reconciles MLflow)."""
    from pipelines.run.ledger import LEDGER_FILE, Ledger

    summary = run_dir / "report" / "summary.json"
    if not ((run_dir / LEDGER_FILE).exists() and summary.exists()):
        return False
    ledger = Ledger.read(run_dir)
    return ledger.tasks == tasks and len(json.loads(summary.read_text())["tasks"]) == len(tasks) and \
        ledger.meta("mlflow_complete", False)


def cmd_status(args) -> int:
    from pipelines.run.ledger import MODEL, StageKey
    from pipelines.run.report import accuracy_matrix, format_matrix
    from pipelines.run.results import find_run, read_run
    from pipelines.run.sequence import format_date

    cfg, ledger = read_run(find_run(_storage(args), args.run))
    names = [t.name for t in cfg.tasks]
    model = ledger.outputs(MODEL) or {}
    precision = model.get("precision", f"{cfg.training.precision}, not resolved yet")
    print(f"run {args.run}: {len(names)} tasks, method {cfg.method.name}, precision {precision}")
    trained = ledger.trained_at()
    for t, name in enumerate(names):
        states = [f"{s}:{'done' if ledger.done(StageKey(s, t)) else 'todo'}" for s in ("prepare", "train", "bank", "evaluate")]
        when = f"trained {format_date(trained[t])}" if t in trained else "not trained yet"
        print(f"  task{t} {name:<28} {when:<30} " + "  ".join(states))
    rows = [ledger.outputs(StageKey("evaluate", t))["rows"]["oracle"]["accuracy"]
            for t in range(len(names)) if ledger.done(StageKey("evaluate", t))]
    if rows:
        print(format_matrix(accuracy_matrix(rows, len(names)), names, scale=1.0))  # not evaluated yet: blank
    return 0


def cmd_ui(args) -> int:
    from pipelines.tracking import default_tracking_uri

    from pipelines.run.results import find_run

    if args.run:
        find_run(_storage(args), args.run)  # an unknown run is an error before the server starts
    uri = default_tracking_uri(_storage(args))
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", args.host,
               "--port", str(args.port), "--workers", "1",
               "--default-artifact-root", (_storage(args) / "mlartifacts").as_uri()]
    # Own process group: mlflow leaves workers behind on SIGTERM to the parent; stop the group.
    # Read before the server starts: it creates the store's tables when there is none yet.
    experiment = _experiment_id(uri, args.run and _storage(args) / args.run) \
        if (_storage(args) / "mlflow.db").exists() else None
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    print(f"MLflow UI on http://{args.host}:{args.port} (store {uri}); Ctrl-C stops it")
    if experiment is not None:  # MLflow's UI opens in its GenAI view unless the link asks for model training
        print(f"runs of the experiment: http://{args.host}:{args.port}/#/experiments/{experiment}"
              f"?workflowType=machine_learning")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _experiment_id(uri: str, run_dir: Path | None) -> str | None:
    """The id of the runs' MLflow experiment (the run's, else the default one) in the store, if any."""
    from mlflow import MlflowClient

    from pipelines.config import MlflowConfig
    from pipelines.run.results import read_run

    name = read_run(run_dir)[0].mlflow.experiment if run_dir else MlflowConfig().experiment
    found = MlflowClient(uri).get_experiment_by_name(name)
    return found and found.experiment_id


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # so that `kill` stops the server group as Ctrl-C does


def cmd_predict(args) -> int:
    from cl_core.bank import atomic_write_text
    from pipelines.run.results import find_run
    from pipelines.serve.predict import PredictError, Predictor, read_queries

    predictor = Predictor(find_run(_storage(args), args.run), args.bank_of)
    if args.task is not None and args.task not in predictor.tasks:
        raise PredictError(f"--task {args.task!r}: not a task of bank {predictor.tasks[-1]!r}; its tasks: "
                           f"{predictor.tasks}")
    queries = read_queries(predictor, Path(args.input), args.task)
    if predictor.thresholds is None:
        print(f"clpipe: warning: bank {predictor.bank_dir} has no decision thresholds (its evaluate stage has not "
              f"stored them): every answer says \"decided\": false", file=sys.stderr)
    lines = "".join(json.dumps(a) + "\n" for a in predictor.predict(queries, progress=True))
    if args.out:
        atomic_write_text(Path(args.out), lines)
        print(f"{len(queries)} predictions from bank {predictor.tasks[-1]} written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0


def cmd_serve(args) -> int:
    from pipelines.run.results import find_run
    from pipelines.serve.api import Limits
    from pipelines.serve.predict import PredictError
    from pipelines.serve.server import TOKEN_ENV, serve_run

    token = os.environ.get(TOKEN_ENV)
    if args.token_file:
        path = Path(args.token_file)
        if not path.is_file() or not path.read_text().strip():
            raise PredictError(f"--token-file {path}: no such file, or it is empty")
        token = path.read_text().strip()
    limits = Limits(max_body_bytes=args.max_body_bytes, max_items=args.max_items,
                    request_timeout_s=args.request_timeout_s, max_queued_requests=args.max_queued_requests)
    return serve_run(find_run(_storage(args), args.run), args.host, args.port, args.replicas, limits, token or None)


def cmd_export(args) -> int:
    from pipelines.run.results import find_run
    from pipelines.serve.export import export_adapter

    info = export_adapter(find_run(_storage(args), args.run), Path(args.to), args.bank_of, args.task)
    print(f"PEFT adapter of run {info['run']}'s bank after {info['bank_after_task']} (tasks "
          f"{', '.join(info['tasks'])}) written to {args.to}; load it with "
          f"PeftModel.from_pretrained(base_model, {str(args.to)!r}); prompts and labels in clpipe.json")
    return 0


def cmd_tune(args) -> int:
    from pipelines.overrides import parse_overrides
    from pipelines.search.tune import run_search

    return run_search(Path(args.config), Path(args.search), _storage(args), parse_overrides(args.overrides))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clpipe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run or resume a task sequence")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="set a dotted config path (training.lr=5e-4)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("validate", help="check a config and its data")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="set a dotted config path (training.lr=5e-4)")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("status", help="stage states and accuracy matrix of a run")
    p.add_argument("run")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("ui", help="MLflow UI on the store")
    p.add_argument("run", nargs="?", help="a run id under --storage (the store is shared by its runs)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
    p = sub.add_parser("tune", help="Ray Tune search over run-config fields")
    p.add_argument("config")
    p.add_argument("search")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="set a dotted config path (training.lr=5e-4)")
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("predict", help="classify texts with a run's bank")
    p.add_argument("run")
    p.add_argument("--input", required=True, help="JSONL/CSV/Parquet rows with 'text' (and 'task', 'id')")
    p.add_argument("--task", help="the task of rows without their own 'task'")
    p.add_argument("--bank-of", help="use the bank after this task (default: the latest evaluated one)")
    p.add_argument("--out", help="write JSON lines here (default: stdout)")
    p.set_defaults(func=cmd_predict)
    from pipelines.serve.api import Limits

    p = sub.add_parser("serve", help="HTTP predictions on Ray Serve, following the run's latest bank")
    p.add_argument("run")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--token-file", help="a file holding the bearer token requests must carry (default: the "
                                        "CLPIPE_SERVE_TOKEN variable); required unless --host is a loopback address")
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes, help="larger bodies get 413")
    p.add_argument("--max-items", type=int, default=Limits.max_items, help="longer lists get 413")
    p.add_argument("--request-timeout-s", type=float, default=Limits.request_timeout_s, help="then 408")
    p.add_argument("--max-queued-requests", type=int, default=Limits.max_queued_requests,
                   help="requests waiting beyond the replicas' own queues; more get 503")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("export", help="a bank that is one LoRA per task, as a PEFT adapter folder")
    p.add_argument("run")
    p.add_argument("--to", required=True, help="a new folder for adapter_config.json, adapter_model.safetensors")
    p.add_argument("--bank-of", help="the bank after this task (default: the latest evaluated one)")
    p.add_argument("--task", help="the task whose LoRA to export, where the method keeps one per task")
    p.set_defaults(func=cmd_export)
    for name, p in sub.choices.items():
        p.add_argument("--storage", default=DEFAULT_STORAGE, help="folder for all state (default: ./runs)")
    args = parser.parse_args(argv)
    from pipelines.config import ConfigError
    from pipelines.data.tasks import DataError
    from pipelines.run.ledger import LedgerError
    from pipelines.serve.predict import PredictError
    from pipelines.tracking import TrackingError

    try:
        return args.func(args)
    except (ConfigError, DataError, TrackingError, PredictError, LedgerError) as e:
        print(f"clpipe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
