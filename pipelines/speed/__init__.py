"""Fast paths: speed options, fused CPU attention, DeepCache."""
