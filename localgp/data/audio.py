"""Audio decoding with PyAV (wav, flac, m4a/aac, G.722, ...), mixed to mono and resampled."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000


def load_audio(path: str | Path, start: float | None = None, end: float | None = None,
               sample_rate: int = SAMPLE_RATE, format: str | None = None) -> np.ndarray:
    """float32 mono samples at `sample_rate`, optionally the segment [start, end) in seconds."""
    import av

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"audio file {path} does not exist")
    try:
        container = av.open(str(path), format=format)
    except av.error.FFmpegError as err:
        raise ValueError(f"cannot decode audio file {path}: {err}") from err
    with container:
        if not container.streams.audio:
            raise ValueError(f"{path} has no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks = []
        for frame in container.decode(audio=0):
            chunks.extend(f.to_ndarray()[0] for f in resampler.resample(frame))
        chunks.extend(f.to_ndarray()[0] for f in resampler.resample(None))
    wav = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if start is not None or end is not None:
        first = int(round((start or 0.0) * sample_rate))
        last = len(wav) if end is None else int(round(end * sample_rate))
        if not 0 <= first < last <= len(wav) + sample_rate // 100:
            raise ValueError(f"{path}: segment [{start}, {end}) s lies outside the audio of {len(wav) / sample_rate:.2f} s")
        wav = wav[first:last]
    return wav.astype(np.float32, copy=False)
