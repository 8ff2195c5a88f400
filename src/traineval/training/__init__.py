"""The engine: the loop, its step types and per-step log, optimizers and schedules,
precision, weight averaging, stops, the LR range test and run checkpoints."""
