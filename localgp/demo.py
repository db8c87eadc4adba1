"""`localgp demo` (what `make demo` runs): the whole pipeline on the demo corpus.

1. prepares the demo corpus (`localgp prepare demo`) unless its manifest exists;
2. trains a small OWSM-architecture model with localGP gates (encoder per frame, decoder per
   token) conditioned on the speech and a speaker embedding (resemblyzer, pretrained, offline),
   for a bounded time or number of steps; a rerun resumes the run;
3. decodes the test split (ASR and ST, beam search, compact execution, batches of utterances);
4. scores it (report.md / report.json: WER per language, BLEU per pair, encoder GFLOPs,
   sparsity per module, seconds per utterance), draws the temporal masks of a test utterance
   and runs the word-start test on the decoder's src-attention decisions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# The gates of the demo model: localGP on the speech ("front") and a speaker embedding.
DEMO_GATES = {"encoder": "temporal", "decoder": "token", "contexts": [["front", 0], ["speaker", 256]]}


def demo_config(out: Path, manifest: Path, steps: int | None, minutes: float, device: str):
    from localgp.runs import TrainConfig

    return TrainConfig(
        out_dir=str(out / "run"), data={"kind": "manifest", "path": str(manifest), "split": "train"},
        preset="tiny", gates=DEMO_GATES, context_extractors={"speaker": {"kind": "resemblyzer"}},
        tasks=("asr", "st"), vocab_size=400, batch_size=8, lr=2e-3, warmup_steps=200,
        max_steps=steps if steps is not None else 1_000_000, max_minutes=None if steps is not None else minutes,
        target_sparsity=0.3, seed=0, device=device, log_every=20, save_every=100)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"demo: --device {device}: torch {torch.__version__} sees no CUDA GPU")
    return device


def run_demo(out: str | Path = "out/demo", data: str | Path = "data/demo", steps: int | None = None,
             minutes: float = 8.0, device: str = "auto", beam: int = 5, batch: int = 8,
             limit: int | None = None) -> dict:
    from localgp import analyze
    from localgp.data.demo_corpus import load_manifest, prepare_demo
    from localgp.decoding import DecodeOptions
    from localgp.evaluate import markdown_table, score, write_report
    from localgp.train import Trainer
    from localgp.transcribe import decode_run

    out, data = Path(out), Path(data)
    device = resolve_device(device)
    manifest = data / "manifest.jsonl"
    if not manifest.is_file():
        log.info("demo: preparing the demo corpus in %s", data)
        prepare_demo(data)
    config = demo_config(out, manifest, steps, minutes, device)
    last = Trainer(config).train()
    log.info("demo: training ended at step %s (loss %.3f)", last.get("step"), last.get("loss", float("nan")))
    records = decode_run(config.out_dir, out / "decoded.jsonl", split="test", options=DecodeOptions(beam_size=beam),
                         batch_size=batch, device=device, limit=limit)
    report = score(records)
    report["training"] = {"steps": last.get("step"), "loss": last.get("loss"), "device": device}
    test = load_manifest(manifest)["test"][0]
    report["mask_figure"] = str(analyze.masks_from_checkpoint(config.out_dir, test.audio, test.language,
                                                              out / "masks.png"))
    try:
        report["word_start"] = analyze.word_start_from_records(records)
    except ValueError as err:  # too few tokens of a kind in a short decode
        report["word_start"] = {"skipped": str(err)}
    write_report(report, out, "localGP + speaker (demo)")
    print(markdown_table(report, "localGP + speaker (demo)"), end="")
    print(json.dumps({"word_start": report["word_start"], "mask_figure": report["mask_figure"]}, indent=2))
    return report
