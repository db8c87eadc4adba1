"""localgp: context-driven dynamic pruning of speech foundation models that saves wall-clock time."""

__version__ = "0.1.0"


def transcribe(*args, **kwargs):
    """Audio files of any length to segments with times: `localgp.longform.transcribe` (see there).
    Imported on the first call, so that `import localgp` stays light."""
    from localgp.longform import transcribe as run

    return run(*args, **kwargs)
