"""Engine: the batch pipeline, the embedding cache and similarity."""
