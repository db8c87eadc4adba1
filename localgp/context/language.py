"""Language context: URIEL typological vectors from lang2vec (offline, 289 values)."""

from __future__ import annotations

import importlib
import os
import sys

import torch

from localgp.errors import UserError

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


class Lang2Vec:
    name, size = "lang2vec", 289

    def __init__(self):
        self._l2v = import_lang2vec()
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, language: str) -> torch.Tensor:
        """(1, 289) for an ISO 639-1 (or 639-3) language code."""
        code = ISO_639_3.get(language, language)
        if code not in self._l2v.available_languages():
            raise UserError(f"Lang2Vec: unknown language code {language!r}; known 639-1 codes: {sorted(ISO_639_3)}")
        if code not in self._cache:
            values = self._l2v.get_features([code], FEATURES)[code]
            self._cache[code] = torch.tensor([float(v) for v in values])[None]
        return self._cache[code]
