"""localgp: context-driven dynamic pruning of speech foundation models that saves wall-clock time."""

__version__ = "0.1.0"
