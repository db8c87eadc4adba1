"""The converted model's tokens against openai-whisper's, clip by clip (ungated, CPU, fp32): on
the demo corpus' test clips, transformers' generate() greedy against `whisper.decode` greedy, and
generate(num_beams=5, custom_generate=whisper_beam_search) against `whisper.decode(beam_size=5)`;
transformers' own beam search (num_beams=5 alone) too with --own-beam. Prints each clip and the
clips that differ.

python benchmarks/hf_whisper_tokens.py [--data data/demo/manifest.jsonl] [--start N] [--stop M]
    [--weights DIR] [--own-beam]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/demo/manifest.jsonl")
    parser.add_argument("--weights", help="`localgp prepare whisper`'s directory (default: its own)")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--stop", type=int)
    parser.add_argument("--own-beam", action="store_true", help="also transformers' own beam search")
    args = parser.parse_args()

    import whisper
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from localgp.backbones.hf_whisper.decoding import whisper_beam_search
    from localgp.backbones.whisper.weights import default_whisper_dir, load_whisper
    from localgp.data.demo_corpus import load_manifest

    directory = Path(args.weights or default_whisper_dir())
    model = WhisperForConditionalGeneration.from_pretrained(directory / "transformers",
                                                            attn_implementation="sdpa").eval()
    processor = WhisperProcessor.from_pretrained(directory / "transformers")
    base = load_whisper(directory).float().eval()
    clips = load_manifest(args.data)["test"][args.start : args.stop]
    plain = whisper.DecodingOptions(without_timestamps=True, fp16=False)
    systems = {"greedy": ({}, plain),
               "beam 5, openai-whisper's beam search": ({"num_beams": 5, "custom_generate": whisper_beam_search},
                                                        dataclasses.replace(plain, beam_size=5))}
    if args.own_beam:
        systems["beam 5, transformers' beam search"] = ({"num_beams": 5}, dataclasses.replace(plain, beam_size=5))
    differ = {name: [] for name in systems}
    for clip in clips:
        wave = clip.load()
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.as_tensor(wave).float()))
        features = processor([wave], sampling_rate=16000, return_tensors="pt").input_features
        same, wants = [], {}  # openai-whisper decodes once per beam size
        for name, (kw, options) in systems.items():
            if options.beam_size not in wants:
                options = dataclasses.replace(options, language=clip.language)
                wants[options.beam_size] = whisper.decode(base, mel, options).tokens
            want = wants[options.beam_size]
            with torch.inference_mode():
                out = model.generate(features, language=clip.language, task="transcribe", max_new_tokens=224, **kw)
            got = [t for t in out[0].tolist() if t != model.generation_config.eos_token_id]
            same.append(got == want)
            if got != want:
                differ[name].append(clip.id)
        print(clip.id, *("same" if s else "DIFFERENT" for s in same), flush=True)
    for name, ids in differ.items():
        print(f"{name}: {len(ids)} of {len(clips)} clips differ from openai-whisper's tokens {ids}")


if __name__ == "__main__":
    main()
