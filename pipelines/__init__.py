"""Pipelines that train, evaluate and report continual-learning runs."""
