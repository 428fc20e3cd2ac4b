"""Secondary tools, each runnable as `python tools/<name>.py` or `python -m tools.<name>`:
benchmarks, the GPU check, model sizes, Hugging Face export, sharded-checkpoint conversion
and WSM checkpoint merging."""
