"""Mid-stage checkpoints hold only what resuming needs: no frozen weight, tied or not."""

import socket

import torch

from cl_core.training import Learner, trainable_parameters
from pipelines.assembly import build_stage
from pipelines.config import parse_config
from pipelines.run.worker import ENGINE_TAG, checkpoint_only_trainable, deepspeed_config, skip_shm_jit
from tests.conftest import tiny_run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_checkpoint_holds_no_frozen_tensor_even_a_tied_lm_head(tmp_path, monkeypatch):
    import deepspeed
    import torch.distributed as dist

    skip_shm_jit()
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                       "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        cfg = parse_config(tiny_run("s", tasks=1, ray={"num_workers": 1}))
        stage = build_stage(cfg, cfg.model.resolved(), setup_task=0)
        lm = stage.model.lm
        lm.lm_head.weight = lm.model.embed_tokens.weight  # tied, as SmolLM2's: frozen under two names
        learner = Learner(stage.model, stage.objective, stage.method)
        trainable = {n for n, p in learner.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(trainable_parameters(learner), lr=1e-3)
        engine, *_ = deepspeed.initialize(model=learner, optimizer=optimizer, dist_init_required=False,
                                          config=deepspeed_config(cfg, 10**6))

        def saved_module(folder):
            engine.save_checkpoint(str(folder), tag=ENGINE_TAG, exclude_frozen_parameters=True)
            return torch.load(folder / ENGINE_TAG / "mp_rank_00_model_states.pt", weights_only=False)["module"]

        plain = saved_module(tmp_path / "plain")
        assert "model.lm.lm_head.weight" in plain  # DeepSpeed alone keeps the tied alias
        checkpoint_only_trainable(learner)
        lean = saved_module(tmp_path / "lean")
        assert set(lean) == trainable and trainable
        frozen_bytes = lm.lm_head.weight.numel() * 4
        size = lambda d: sum(f.stat().st_size for f in (d / ENGINE_TAG).iterdir())
        assert size(tmp_path / "plain") - size(tmp_path / "lean") >= frozen_bytes
    finally:
        dist.destroy_process_group()
