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
CHUNK = 512  # samples Silero VAD decides on at 16 kHz


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
    that no word loses its edges.

    Silero's network reads 32 ms chunks (512 samples, with the 64 before them as context) through
    an STFT and convolutions that see that chunk alone, then an LSTM cell that carries state from
    chunk to chunk. Its own loop (`get_speech_timestamps`) calls the whole network once per chunk:
    1.5 s for 170 s of audio, as long as decoding a window. Here the per-chunk part runs on blocks
    of chunks at once and the recurrence as one `nn.LSTM` over them with the cell's weights: the
    same function (probabilities within 1e-4 of its own, the same regions: tests), 10x faster,
    then silero's own `get_speech_timestamps_from_probs` cuts the regions."""

    BLOCK = 4096  # chunks (131 s of audio) per batched pass: bounds the memory on hour-long files

    def __init__(self, threshold: float = 0.5, min_silence_ms: int = 160, pad_ms: int = 200,
                 max_seconds: float = WINDOW_SECONDS):
        threads = torch.get_num_threads()
        from silero_vad import load_silero_vad  # its import sets torch.set_num_threads(1) for the whole process

        torch.set_num_threads(threads)  # which would halve Whisper's speed on 2 cores (transcribe: 16 -> 10 s)
        self.model = load_silero_vad()  # the TorchScript model inside the wheel
        self.threshold, self.min_silence_ms, self.pad_ms, self.max_seconds = threshold, min_silence_ms, pad_ms, max_seconds
        try:  # the 16 kHz network's parts (silero-vad pinned in requirements.txt)
            net = self.model._model
            self.stft, self.encoder, self.head = net.stft, net.encoder, net.decoder.decoder
            self.context = int(net.context_size_samples)
            cell = net.decoder.rnn
            self.lstm = torch.nn.LSTM(cell.weight_ih.shape[1], cell.weight_hh.shape[1])
            with torch.no_grad():
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(self.lstm, f"{name}_l0").copy_(getattr(cell, name))
        except (AttributeError, RuntimeError) as err:
            raise RuntimeError(f"silero-vad's model is not laid out as the pinned version's (stft, encoder, "
                               f"LSTM cell, decoder): {err}; install the silero-vad of requirements.txt") from err
        self.lstm.eval()

    @torch.inference_mode()
    def probabilities(self, wav: np.ndarray) -> list[float]:
        """The speech probability of every 512-sample chunk (the last one zero-padded), as the
        model's own per-chunk call gives it."""
        audio = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
        n = -(-len(audio) // CHUNK)
        chunks = torch.nn.functional.pad(audio, (0, n * CHUNK - len(audio))).view(n, CHUNK)
        context = torch.cat([chunks.new_zeros(1, self.context), chunks[:-1, -self.context:]])
        chunks = torch.cat([context, chunks], dim=1)
        state, probs = None, []
        for start in range(0, n, self.BLOCK):
            features = self.encoder(self.stft(chunks[start : start + self.BLOCK]))  # (chunks, 128, 1)
            hidden, state = self.lstm(features.squeeze(-1), state)  # the chunks as one sequence
            probs += self.head(hidden[:, :, None]).squeeze(1).mean(1).tolist()
        return probs

    def __call__(self, wav: np.ndarray) -> list[tuple[int, int]]:
        from silero_vad import get_speech_timestamps_from_probs

        found = get_speech_timestamps_from_probs(self.probabilities(wav), sampling_rate=SAMPLE_RATE,
                                                 threshold=self.threshold, max_speech_duration_s=self.max_seconds,
                                                 min_silence_duration_ms=self.min_silence_ms,
                                                 speech_pad_ms=self.pad_ms, audio_length_samples=len(wav))
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
