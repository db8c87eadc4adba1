"""Long-form transcription of audio files (`localgp transcribe`, `localgp.transcribe(...)`):
pipeline.py (inputs, the model, batched decoding of every file's windows, the summary), vad.py
(Silero VAD: windows of at most 30 s cut at pauses), outputs.py (segments, transcripts, and
their .txt/.srt/.vtt/.json files written atomically)."""

from localgp.longform.outputs import FORMATS, Segment, Transcript  # noqa: F401 (the package's interface)
from localgp.longform.pipeline import Failure, Result, Transcriber, summary, transcribe  # noqa: F401
