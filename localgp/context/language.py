"""Language context: URIEL typological vectors from lang2vec (offline, 289 values)."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import torch

from localgp.errors import DamagedFile, UserError
from localgp.files import read_json, write_text_atomically

FEATURES = "syntax_knn+phonology_knn+inventory_knn"
# ISO 639-1 codes of the data -> the ISO 639-3 codes lang2vec uses.
ISO_639_3 = {
    "en": "eng", "de": "deu", "fr": "fra", "it": "ita", "es": "spa", "pt": "por", "nl": "nld",
    "pl": "pol", "ro": "ron", "ja": "jpn", "zh": "cmn", "ru": "rus", "ko": "kor", "ar": "arb",
}


def import_lang2vec():
    """lang2vec.lang2vec. Its distribution also installs a script lang2vec.py among the console
    scripts, and a console script (`localgp train`) runs with that directory first on sys.path, where
    the script would shadow the package: the import skips every directory holding a lang2vec.py."""
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if not os.path.isfile(os.path.join(p or os.curdir, "lang2vec.py"))]
    try:
        return importlib.import_module("lang2vec.lang2vec")
    finally:
        sys.path[:] = saved


def default_cache_dir() -> Path:
    """$LOCALGP_CACHE/lang2vec, else ~/.cache/localgp/lang2vec."""
    cache = os.environ.get("LOCALGP_CACHE")
    return (Path(cache) if cache else Path.home() / ".cache" / "localgp") / "lang2vec"


class Lang2Vec:
    """A language's URIEL vector. lang2vec loads its tables on import (about 4 s, and 1 s more for a
    language's first vector, measured on this CPU): each vector is kept on disk, in
    cache_dir/<lang2vec version>/<FEATURES>/<code>.json, and lang2vec is imported only for a
    language not there yet."""

    name, size = "lang2vec", 289

    def __init__(self, cache_dir: str | Path | None = None):
        from importlib.metadata import version

        self._l2v = None  # lang2vec.lang2vec, imported on the first vector not on disk
        self._cache: dict[str, torch.Tensor] = {}
        self.cache_dir = Path(cache_dir or default_cache_dir()) / version("lang2vec") / FEATURES

    def __call__(self, language: str) -> torch.Tensor:
        """(1, 289) for an ISO 639-1 (or 639-3) language code."""
        code = ISO_639_3.get(language, language)
        if code not in self._cache:
            self._cache[code] = torch.tensor(self._values(language, code))[None]
        return self._cache[code]

    def _values(self, language: str, code: str) -> list[float]:
        path = self.cache_dir / f"{code}.json"
        if path.is_file():
            fix = "delete it (a cache: lang2vec computes it again)"
            values = read_json(path, fix, expect=list)
            if len(values) != self.size or not all(isinstance(v, (int, float)) for v in values):
                raise DamagedFile(path, f"not {self.size} numbers", fix)
            return [float(v) for v in values]
        if self._l2v is None:
            self._l2v = import_lang2vec()
        if code not in self._l2v.available_languages():
            raise UserError(f"Lang2Vec: unknown language code {language!r}; known 639-1 codes: {sorted(ISO_639_3)}")
        values = [float(v) for v in self._l2v.get_features([code], FEATURES)[code]]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, json.dumps(values))
        return values
