"""Fast paths: speed options per device, fused CPU attention, prepacked convolutions, the VAE's precision,
DeepCache, and measuring (peak memory, PSNR, FLOPs against the matmul peak)."""
