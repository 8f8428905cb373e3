"""Cluster recipes for clpipe: DeepSpeed config templates, a Ray runtime_env and a job submission script."""
