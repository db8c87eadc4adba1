"""ESPnet's imports without the noise of optional parts localgp never uses, nothing else hidden.

- ESPnet's S2T task imports its phoneme tokenizer, which imports g2p_en, which calls
  `nltk.download` at import time for data it lacks: offline, nltk prints 8 `[nltk_data] Error
  loading ...` lines. localgp's tokenizers are BPE (sentencepiece, Whisper's), never g2p: during
  these imports `nltk.download` is not attempted (logged at debug level). Were g2p ever used,
  nltk would still raise its LookupError naming the missing data.
- ESPnet's attention module prints "Failed to import Flash Attention, using ESPnet default"
  when flash_attn is absent: localgp runs its own attention, so that line, and only that line,
  goes to the debug log; anything else printed during the import is printed as before."""

from __future__ import annotations

import contextlib
import io
import logging

log = logging.getLogger(__name__)
FLASH_NOTICE = "Failed to import Flash Attention"


@contextlib.contextmanager
def espnet_imports():
    import nltk

    download = nltk.download

    def skip_download(info_or_id=None, *args, **kwargs):
        log.debug("not downloading nltk data %r while importing ESPnet (g2p_en's; localgp does not use g2p)",
                  info_or_id)
        return False

    nltk.download = skip_download
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        nltk.download = download
        for line in printed.getvalue().splitlines():
            if line.startswith(FLASH_NOTICE):
                log.debug("%s", line)
            else:
                print(line)
