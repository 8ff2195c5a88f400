"""The error a checkpoint that cannot be used raises (`traineval.runs.checkpoint` and
`traineval.runs.sharded` both raise it; defined here so neither imports the other)."""


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: missing, truncated, corrupt or unsafe."""
