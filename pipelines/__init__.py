"""sd-app library: Stable Diffusion 1.x generation, model loading, reranking and speed (no UI, no CLI)."""
