"""Reranking candidates: the CLIP scorer, preference scorers (PickScore, LAION aesthetic), best-of-N and
the embedding map."""
