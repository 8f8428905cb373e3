"""A bank leaves clpipe: as a PEFT adapter (`clpipe export`) and as a registered MLflow model.

In process: the adapter of a bank with a LoRA per task, and of O-LoRA's summed LoRAs, computes what
the bank computes. On a tiny sequential-LoRA run (slow): `PeftModel.from_pretrained` on the
exported folder, and `mlflow.pyfunc.load_model("models:/<run>@latest")`, give `clpipe predict`'s
labels on 12 texts; the registry holds one version per bank, and a rerun adds none.
"""

from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from peft import PeftModel

from cl_core.base_model import load_base_model
from cl_core.experts import ExpertMeta
from cl_core.objectives import answer_ids, encode_prompt
from pipelines.cli import main
from pipelines.config import parse_config
from pipelines.data.tasks import load_split
from pipelines.run.driver import Driver
from pipelines.serve.export import peft_adapter
from pipelines.serve.mlflow_model import SHA_TAG, TASK_TAG
from pipelines.serve.predict import PredictError, Predictor
from pipelines.tracking import default_tracking_uri
from tests.conftest import TINY, tiny_model, tiny_run

TEXTS = 12


def _trained_bank(router: str, experts: list[ExpertMeta]):
    """A tiny bank with these experts, every factor random (B too: a fresh LoRA adds nothing)."""
    model, tok = tiny_model(router=router)
    for meta in experts:
        model.bank.add_expert(meta)
    with torch.no_grad():
        for p in model.bank.expert_parameters().values():
            p.normal_(std=0.3)
    return model.eval(), tok


@pytest.mark.parametrize("router, task", [("task", 1), ("merged", 1)])
def test_the_adapter_computes_what_the_bank_computes(router, task):
    model, _ = _trained_bank(router, [ExpertMeta(f"task{t}", "task", t) for t in range(3)])
    ids = torch.randint(8, 256, (3, 11))
    with torch.no_grad(), model.bank.routing(task_ids=torch.full((3,), task), attention_mask=torch.ones_like(ids)):
        want = model.lm(ids).logits
    adapter = peft_adapter(model, load_base_model(TINY)[0], task)
    with torch.no_grad():
        got = adapter(input_ids=ids).logits
        base = load_base_model(TINY)[0](ids).logits
    assert not torch.allclose(base, want, atol=1e-3)  # the LoRAs change the answer
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert adapter.peft_config["default"].r == 8 * (3 if router == "merged" else 1)


def test_a_mixture_of_experts_is_no_adapter():
    model, _ = _trained_bank("task", [ExpertMeta("shared0", "shared"), ExpertMeta("task0.0", "task", 0)])
    with pytest.raises(PredictError, match="mixes 2 experts per token"):
        peft_adapter(model, load_base_model(TINY)[0], 0)


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    storage = tmp_path_factory.mktemp("export")
    cfg = parse_config(tiny_run("export", method={"name": "seq_lora", "params": {}}, ray={"num_workers": 1}))
    Driver(cfg, storage, lambda _: None).run()
    return cfg, storage, storage / cfg.run_id


def _rows(cfg, t: int) -> list[dict]:
    return [{"text": r["text"], "task": cfg.tasks[t].name} for r in load_split(cfg.tasks[t], "test", t, cfg.data).rows[:TEXTS]]


def _predicted(run, rows, tmp_path, bank_of=None) -> list[dict]:
    cfg, storage, _ = run
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["predict", cfg.run_id, "--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"),
            "--storage", str(storage)] + (["--bank-of", bank_of] if bank_of else [])
    assert main(argv) == 0
    return [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_exported_adapter_labels_as_predict(run, tmp_path, capsys):
    cfg, storage, run_dir = run
    out = tmp_path / "adapter"
    assert main(["export", cfg.run_id, "--to", str(out), "--storage", str(storage)]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "clpipe.json"} <= {p.name for p in out.iterdir()}
    info = json.loads((out / "clpipe.json").read_text())
    assert list(info["tasks"]) == [t.name for t in cfg.tasks]  # one LoRA answers both tasks
    base, tok = load_base_model(Predictor(run_dir).base)
    adapter = PeftModel.from_pretrained(base, str(out)).eval()
    formats = Predictor(run_dir).formats
    for t, task in enumerate(cfg.tasks):
        rows = _rows(cfg, t)
        want = _predicted(run, rows, tmp_path)
        labels = info["tasks"][task.name]["labels"]
        for row, answer in zip(rows, want):
            prompt = encode_prompt(tok, formats[t], row["text"])
            scores = []
            for tokens in answer_ids(tok, formats[t]):  # the label's log-likelihood after the prompt
                with torch.no_grad():
                    logp = torch.log_softmax(adapter(input_ids=torch.tensor([prompt + tokens])).logits[0].float(), -1)
                scores.append(sum(float(logp[len(prompt) - 1 + i, tok_id]) for i, tok_id in enumerate(tokens)))
            probs = torch.softmax(torch.tensor(scores), 0).tolist()
            assert labels[max(range(len(labels)), key=scores.__getitem__)] == answer["label"]
            assert probs == pytest.approx([answer["probs"][label] for label in labels], abs=1e-4)
    capsys.readouterr()
    assert main(["export", cfg.run_id, "--to", str(out), "--storage", str(storage)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err


@pytest.mark.slow
def test_registry_holds_a_version_per_bank_and_latest_predicts_as_predict(run, tmp_path):
    cfg, storage, run_dir = run
    uri = default_tracking_uri(storage)
    client = MlflowClient(uri)
    ledger = json.loads((run_dir / "ledger.json").read_text())["stages"]

    def versions():
        return sorted((int(v.version), v.tags[TASK_TAG], v.tags[SHA_TAG])
                      for v in client.search_model_versions(f"name = '{cfg.run_id}'"))

    assert versions() == [(t + 1, task.name, ledger[f"task{t}/bank"]["outputs"]["sha256"])
                          for t, task in enumerate(cfg.tasks)]
    assert int(client.get_model_version_by_alias(cfg.run_id, "latest").version) == 2
    evaluate_run = client.get_run(client.get_model_version(cfg.run_id, "1").run_id)
    assert evaluate_run.data.tags["clpipe.stage"] == "task0/evaluate"
    Driver(cfg, storage, lambda _: None).run()  # a rerun logs no bank again
    assert len(versions()) == 2

    mlflow.set_tracking_uri(uri)
    for uri_suffix, bank_of in (("@latest", None), ("/1", cfg.tasks[0].name)):
        model = mlflow.pyfunc.load_model(f"models:/{cfg.run_id}{uri_suffix}")
        rows = _rows(cfg, 0)
        got = model.predict(pd.DataFrame(rows)).to_dict("records")
        want = _predicted(run, rows, tmp_path, bank_of)
        assert [(g["label"], g["decided"], g["task"]) for g in got] == [(w["label"], w["decided"], w["task"]) for w in want]
        for g, w in zip(got, want, strict=True):
            assert g["probs"] == pytest.approx(w["probs"], abs=1e-6)
