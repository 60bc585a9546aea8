"""Scripts that build and train the embedded model (run as ``python -m pipelines.training.<stage>``)."""
