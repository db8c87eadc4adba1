"""Cutting a recording at its pauses into windows that Whisper reads whole (at most 30 s).

The voice-activity detector is Silero VAD (PyPI `silero-vad`, MIT): it ships its model in the
wheel (nothing is downloaded at run time), runs on torch, which localgp has anyway (its other
dependencies are optional extras), is maintained, and is what faster-whisper's batched pipeline
and WhisperX cut with. webrtcvad (in the environment for resemblyzer) only says speech or not per
10-30 ms frame from band energies, and misses quiet or noisy speech far more often.

As in faster-whisper's batched pipeline, consecutive speech regions are merged into one window
while the window spans at most 30 s; the pauses inside a window stay in its audio, the silence
between windows is never decoded. Times are sample indices of the recording."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from localgp.data.audio import SAMPLE_RATE

WINDOW_SECONDS = 30.0  # Whisper's window: longer audio would be cut off unread


@dataclass(frozen=True)
class Window:
    start: int  # first sample, in the recording
    end: int  # one past the last sample

    @property
    def seconds(self) -> float:
        return (self.end - self.start) / SAMPLE_RATE


class SileroVAD:
    """Speech regions of a 16 kHz recording: Silero VAD with faster-whisper's batched settings
    (regions cut at 30 s, pauses of 160 ms split them) and 200 ms of padding kept around each, so
    that no word loses its edges."""

    def __init__(self, threshold: float = 0.5, min_silence_ms: int = 160, pad_ms: int = 200,
                 max_seconds: float = WINDOW_SECONDS):
        from silero_vad import load_silero_vad

        self.model = load_silero_vad()  # the TorchScript model inside the wheel
        self.threshold, self.min_silence_ms, self.pad_ms, self.max_seconds = threshold, min_silence_ms, pad_ms, max_seconds

    def __call__(self, wav: np.ndarray) -> list[tuple[int, int]]:
        from silero_vad import get_speech_timestamps

        with torch.inference_mode():
            found = get_speech_timestamps(torch.from_numpy(np.ascontiguousarray(wav)), self.model,
                                          threshold=self.threshold, sampling_rate=SAMPLE_RATE,
                                          max_speech_duration_s=self.max_seconds,
                                          min_silence_duration_ms=self.min_silence_ms, speech_pad_ms=self.pad_ms)
        return [(int(t["start"]), int(t["end"])) for t in found]


def speech_windows(speech: list[tuple[int, int]], max_seconds: float = WINDOW_SECONDS) -> list[Window]:
    """Speech regions (start, end) in samples, in order, merged into windows of at most
    max_seconds: a region joins the current window while the window then still spans at most
    max_seconds; a region longer than that alone (the VAD's own cut can exceed it by its padding)
    is cut into equal parts first."""
    limit = int(max_seconds * SAMPLE_RATE)
    parts = []
    for start, end in speech:
        pieces = -(-(end - start) // limit)  # ceil
        bounds = np.linspace(start, end, pieces + 1).round().astype(int)
        parts += [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    windows: list[Window] = []
    for start, end in parts:
        if windows and end - windows[-1].start <= limit:
            windows[-1] = Window(windows[-1].start, max(end, windows[-1].end))
        else:
            windows.append(Window(start, end))
    return windows
