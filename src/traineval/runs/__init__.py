"""The run directory and what lives in it: the folder and its lock, checkpoints and their
writer, resume, the metric history."""
