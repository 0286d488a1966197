"""The eval runner (the main job), kernel and offload benchmarks, plots and the report."""
