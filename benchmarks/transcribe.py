"""Long-form transcription side by side: openai-whisper's `transcribe`, faster-whisper's batched
pipeline (float32, int8), localgp dense and localgp gated compact, on a recording assembled from
the demo corpus' held-out test clips. See localgp/bench/transcribe.py.

    python benchmarks/transcribe.py [--seconds 300] [--run RUN (default: the run out/demo/report.json names)] [--json F]
"""

import sys

from localgp.bench.transcribe import main

if __name__ == "__main__":
    sys.exit(main())
