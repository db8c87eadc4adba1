"""Audio decoding with PyAV (wav, flac, m4a/aac, G.722, ...), mixed to mono and resampled."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from localgp.errors import UserError

SAMPLE_RATE = 16000
# The shortest audio every part of localgp takes: the context extractors' 0.1 s (OWSM's conv2d
# subsampling alone needs 0.06 s: 7 fbank frames for one encoder frame).
MIN_SAMPLES = SAMPLE_RATE // 10


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
        raise UserError(f"cannot decode audio file {path}: {err}") from err
    with container:
        if not container.streams.audio:
            raise UserError(f"{path} has no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks = []
        try:
            for frame in container.decode(audio=0):
                chunks.extend(f.to_ndarray()[0] for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray()[0] for f in resampler.resample(None))
        except av.error.FFmpegError as err:  # e.g. a compressed file cut short
            raise UserError(f"cannot decode audio file {path}: {err}") from err
    wav = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if start is not None or end is not None:
        first = int(round((start or 0.0) * sample_rate))
        last = len(wav) if end is None else int(round(end * sample_rate))
        if not 0 <= first < last <= len(wav) + sample_rate // 100:
            raise UserError(f"{path}: segment [{start}, {end}) s lies outside the audio of {len(wav) / sample_rate:.2f} s")
        wav = wav[first:last]
    return wav.astype(np.float32, copy=False)


def declared_seconds(path: str | Path) -> float | None:
    """The duration the file's header declares (None: it declares none), to tell a file cut
    short from a short one. WAV: its data chunk's size (FFmpeg reports what the file holds);
    other formats: the container's or stream's duration."""
    import av

    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
            block_align = rate = None
            while len(chunk := f.read(8)) == 8:
                name, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if name == b"fmt ":
                    fmt = f.read(size)
                    rate, block_align = struct.unpack("<I", fmt[4:8])[0], struct.unpack("<H", fmt[12:14])[0]
                    size = 0
                elif name == b"data":
                    # 0 or 0xFFFFFFFF: a writer that could not seek back to fill in the size (a stream)
                    if not rate or not block_align or size in (0, 0xFFFFFFFF):
                        return None
                    return size // block_align / rate
                f.seek(size + size % 2, 1)  # chunks are padded to an even size
            return None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.audio[0] if container.streams.audio else None
            if stream is not None and stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
            return container.duration / 1e6 if container.duration else None
    except av.error.FFmpegError:
        return None  # load_audio names the error


def load_checked(path: str | Path, format: str | None = None) -> np.ndarray:
    """load_audio of a whole file, refused (UserError saying why) when its samples cannot be used:
    it cannot be decoded, holds NaN or infinite samples, or holds less than its header declares
    (a file cut short)."""
    try:
        wav = load_audio(path, format=format)
    except OSError as err:
        raise UserError(str(err)) from err
    if not np.isfinite(wav).all():  # a float file can hold them; they would turn every result NaN
        raise UserError(f"{path} holds samples that are NaN or infinite")
    declared = declared_seconds(path)
    if declared is not None and len(wav) / SAMPLE_RATE < declared - 0.02:
        raise UserError(f"{path} holds {len(wav) / SAMPLE_RATE:.2f} s of audio but its header declares "
                        f"{declared:.2f} s (cut short?)")
    return wav
