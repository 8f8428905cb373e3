"""Pinning what comes from the Hugging Face hub: a model's or dataset's `revision` (a branch, tag
or commit; None: the default branch) is resolved to its commit when the run first reads it. The
ledger keeps that commit and every later stage and rerun reads it, so a hub update during a
multi-day run changes nothing in it."""

from __future__ import annotations

from pathlib import Path

LOCAL = "local"  # what a local model or data file records in place of a commit


def hub_commit(repo_id: str, revision: str | None, repo_type: str) -> str:
    """The commit `revision` of the hub repository names now (asks the hub)."""
    from huggingface_hub import HfApi

    return HfApi().repo_info(repo_id, revision=revision, repo_type=repo_type).sha


def is_hub_model(kind: str, path: str | None) -> bool:
    """An `hf` model whose path is not a local directory is a hub id."""
    return kind == "hf" and path is not None and not Path(path).exists()
