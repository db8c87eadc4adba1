import sys
from pathlib import Path

# `pytest benchmarks/...` from the repository root imports benchmarks/* as plain modules.
sys.path.insert(0, str(Path(__file__).resolve().parent))
