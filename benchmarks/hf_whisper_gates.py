"""One set of gates for both Whisper implementations: a `localgp train` run's gates (trained on
localgp's openai-whisper adapter) loaded into transformers' WhisperForConditionalGeneration.
On the demo corpus' test clips (ASR, batches of 8, compact execution, beam 5):

- the encoder masks of both, frame for frame (mismatching frame-module units counted);
- WER per language of transformers' own generate() on the gated model, with openai-whisper's beam
  search (custom_generate=whisper_beam_search) and with transformers' own (num_beams=5 alone),
  against localgp's WhisperBeamSearch on the gated openai-whisper model (Whisper's normalizers,
  corpus WER); the transcripts identical to localgp's counted;
- and the same through pipeline("automatic-speech-recognition", batch_size=8) with openai-whisper's
  beam search, the speaker contexts queued (queue_context).

python benchmarks/hf_whisper_gates.py --run out/demo/localgp+speaker-0.6/run [--weights DIR]
    [--data data/demo/manifest.jsonl] [--limit N] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--weights", help="`localgp prepare whisper`'s directory (default: its own)")
    parser.add_argument("--data", default="data/demo/manifest.jsonl")
    parser.add_argument("--limit", type=int, help="the first N test clips only")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args()

    import jiwer
    from transformers import WhisperForConditionalGeneration, WhisperProcessor, pipeline

    from localgp.backbones.hf_whisper.decoding import whisper_beam_search
    from localgp.backbones.hf_whisper.model import gates_from_openai, queue_context
    from localgp.backbones.whisper.bench import log_mel
    from localgp.context.feeder import ContextFeeder
    from localgp.data.demo_corpus import load_manifest
    from localgp.backbones.whisper.decoding import WhisperBeamSearch, WhisperDecodeOptions
    from localgp.evaluate import normalise_for
    from localgp.model.convert import last_record, set_execution
    from localgp.backbones.whisper.weights import default_whisper_dir
    from localgp.runs import load_run

    run = load_run(args.run)
    source = run.model
    directory = Path(args.weights or default_whisper_dir()) / "transformers"
    model = gates_from_openai(WhisperForConditionalGeneration.from_pretrained(directory).eval(), source)
    processor = WhisperProcessor.from_pretrained(directory)
    set_execution(source, "compact")
    set_execution(model, "compact")
    feeder = ContextFeeder(source, run.config.context_extractors, Path(run.config.out_dir) / "context",
                           run.backbone.prompt_context)
    search = WhisperBeamSearch(source, WhisperDecodeOptions(beam_size=5, execution="compact"))
    clips = load_manifest(args.data)["test"][: args.limit]
    units = differing = 0
    openai_search = {"custom_generate": whisper_beam_search, "max_new_tokens": 224}
    ours = "openai-whisper (localgp)"
    searches = {"transformers generate(), openai-whisper's beam search": openai_search,
                "transformers generate(), transformers' beam search": {}}
    piped = f"transformers pipeline(batch_size={args.batch}), openai-whisper's beam search"
    asr = pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                   feature_extractor=processor.feature_extractor, device="cpu")
    texts = {ours: [], **{name: [] for name in searches}, piped: []}
    refs, langs = [], []
    seconds = dict.fromkeys(texts, 0.0)
    for start in range(0, len(clips), args.batch):
        batch = clips[start : start + args.batch]
        waves, languages = [u.load() for u in batch], [u.language for u in batch]
        feeder.set_waves(waves, None)
        model.model.encoder.external_context = dict(source.encoder.external_context)
        with torch.inference_mode():
            t = time.perf_counter()
            hyps = search(source.encoder(log_mel(waves, "cpu", torch.float32)), languages)
            seconds[ours] += time.perf_counter() - t
            want = last_record(source).masks
            for name, kw in searches.items():
                t = time.perf_counter()
                features = processor(waves, sampling_rate=16000, return_tensors="pt").input_features
                out = model.generate(features, language=languages, task="transcribe", num_beams=5, **kw)
                seconds[name] += time.perf_counter() - t
                texts[name] += processor.batch_decode(out, skip_special_tokens=True)
            if source.encoder.external_context:
                queue_context(model, **source.encoder.external_context)
            t = time.perf_counter()
            texts[piped] += [r["text"] for r in asr(waves, batch_size=args.batch, generate_kwargs=dict(
                language=languages, task="transcribe", num_beams=5, **openai_search))]
            seconds[piped] += time.perf_counter() - t
            model.model.encoder.context_queue = {}  # every clip took its own: the next calls take external_context
            model.model.encoder.external_context = dict(source.encoder.external_context)
            model.model.encoder(features)  # the masks of the encoder pass alone (generate ran it once too)
            got = last_record(model.model).masks
        for name, mask in want.items():
            units += mask.numel()
            differing += int((got[name] != mask).sum())
        texts[ours] += [h.text for h in hyps]
        refs += [u.text for u in batch]
        langs += languages
        print(f"{start + len(batch)}/{len(clips)} clips, differing mask units so far: {differing} of {units}", flush=True)

    report = dict(run=args.run, clips=len(clips), mask_units=units, differing_mask_units=differing, wer={},
                  seconds=seconds)
    for system, hyps in texts.items():
        wer = {}
        for lang in sorted(set(langs)):
            pairs = [(normalise_for(r, lang, "whisper"), normalise_for(h, lang, "whisper"))
                     for r, h, x in zip(refs, hyps, langs) if x == lang]
            wer[lang] = 100 * jiwer.wer([r for r, _ in pairs], [h for _, h in pairs])
        wer["average"] = sum(wer.values()) / len(wer)
        report["wer"][system] = wer
    report["identical_transcripts"] = {name: sum(a.strip() == b.strip() for a, b in zip(texts[ours], texts[name]))
                                       for name in texts if name != ours}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
