"""Training-side helpers for `xtuner train`: CPU shims (`cpu_shims`)."""
