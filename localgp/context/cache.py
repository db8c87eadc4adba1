"""Context features cached on disk per extractor and utterance, so training does not recompute them."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from localgp.errors import DamagedFile, reader_error

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


class FeatureCache:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def path(self, extractor: str, utterance_id: str) -> Path:
        return self.directory / _SAFE.sub("_", extractor) / f"{_SAFE.sub('_', utterance_id)}.npy"

    def get(self, extractor: str, utterance_id: str, compute) -> torch.Tensor:
        """The cached features, or compute() stored atomically (a crash never leaves half a file)."""
        path = self.path(extractor, utterance_id)
        if path.exists():
            try:
                return torch.from_numpy(np.load(path))
            except (ValueError, OSError, EOFError) as err:  # np.load's errors on a file that is no .npy
                raise DamagedFile(path, reader_error(err), "delete it: it is a cache, computed again when missing") from err
        features = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        try:
            np.save(tmp, features.detach().cpu().numpy())
            os.replace(tmp, path)
        finally:  # a failed write leaves no temporary behind (after os.replace there is none)
            tmp.unlink(missing_ok=True)
        return features
