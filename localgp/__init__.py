"""localgp: context-driven dynamic pruning of speech foundation models that saves wall-clock time."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `localgp.transcribe(paths, ...)` without importing anything first: the submodule, callable
    if name == "transcribe":
        import importlib

        return importlib.import_module("localgp.transcribe")
    raise AttributeError(f"module 'localgp' has no attribute {name!r}")
