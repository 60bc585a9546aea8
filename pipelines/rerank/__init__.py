"""Reranking candidates: the CLIP scorer, best-of-N and the embedding map."""
