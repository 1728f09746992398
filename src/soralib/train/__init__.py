"""Training harness: GLUE/custom data loading, batching and metrics."""
