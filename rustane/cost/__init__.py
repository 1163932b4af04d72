"""Cost and memory model of a training step on the Neural Engine (docs/cost-model.md)."""
