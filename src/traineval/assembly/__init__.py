"""Assembling a run: named build phases and `TrainingManager`, the specification's facade
over them."""
