"""Performance benchmarks (run as modules, e.g. `python -m benchmarks.expert_layer`)."""
