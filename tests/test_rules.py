"""The training-free rules (padding, silence, attention) on Whisper, against plain references
written here from openai-whisper's own blocks; the sparsity by kind of frame; a recording's
context computed once in `localgp transcribe`; the rules' user errors. Tiny random models for the
numerics, the real Whisper base (conftest's whisper_base) and real speech end to end."""

import copy
import json

import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from localgp.data.audio import SAMPLE_RATE
from localgp.gates import GateRecord
from localgp.model.config import Rule, parse_rule
from localgp.model.convert import set_execution
from localgp.backbones.whisper.model import (
    PADDING, SILENCE, SPEECH, block_modules, frame_kinds, gate_whisper_rule, rule_keep, sparsity_by_kind,
)
from tests.test_whisper_model import DIMS, inputs, tiny_whisper

T = DIMS.n_audio_ctx


def calibrated(model):
    gen = torch.Generator().manual_seed(7)
    model.encoder.calibrate_skip_values([torch.randn(3, DIMS.n_mels, 2 * T, generator=gen)],
                                        [torch.tensor([8 * 320, 3 * 320, 20 * 320])])
    return model


def embed(model, mel):
    x = F.gelu(model.encoder.conv2(F.gelu(model.encoder.conv1(mel)))).permute(0, 2, 1)
    return x + model.encoder.positional_embedding


def rule_reference(model, mel, keep):
    """Every block: a kept frame adds attn(attn_ln(x)) (over every frame's keys) and mlp(mlp_ln(x)),
    a skipped one the calibrated mean output of that module at its position."""
    x = embed(model, mel)
    table = model.encoder.pruning.skip_values.values
    for index, block in enumerate(model.encoder.blocks):
        for m, name in enumerate(("attn", "mlp")):
            x = x + torch.where(keep[..., None], block_modules(block)[name](x), table[index, m])
    return model.encoder.ln_post(x)


@pytest.mark.parametrize("name", ["padding", "silence"])
@pytest.mark.parametrize("execution", ["masked", "compact"])
def test_padding_and_silence_rules_are_the_masked_reference(name, execution):
    model = calibrated(gate_whisper_rule(tiny_whisper(), Rule(name)))
    mel, _ = inputs(B=3)
    kinds = torch.full((3, T), PADDING, dtype=torch.int8)
    kinds[0, :10], kinds[0, 3:6] = SPEECH, SILENCE
    kinds[1, :T] = SPEECH  # a full window
    kinds[2, :1] = SPEECH  # one frame of audio
    keep = rule_keep(Rule(name), kinds)
    model.encoder.set_rule_keep(keep)
    set_execution(model, execution)
    with torch.no_grad():
        got = model.encoder(mel)
        want = rule_reference(model, mel, keep)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    record = model.encoder.last_record
    for index in range(DIMS.n_audio_layer):
        assert torch.equal(record.masks[f"encoder.{index}.attn"].bool(), keep)
    assert (keep[0] == (kinds[0] != PADDING if name == "padding" else kinds[0] == SPEECH)).all()


def test_rule_keep_is_needed_and_checked():
    model = calibrated(gate_whisper_rule(tiny_whisper(), Rule("padding")))
    mel, _ = inputs(B=2)
    with pytest.raises(ValueError, match="set_rule_keep"):
        model.encoder(mel)
    with pytest.raises(ValueError, match="bool"):
        model.encoder.set_rule_keep(torch.ones(2, T))
    model.encoder.set_rule_keep(torch.ones(3, T, dtype=torch.bool))
    with pytest.raises(ValueError, match="kept frames of the batch"):
        model.encoder(mel)
    uncalibrated = gate_whisper_rule(tiny_whisper(), Rule("silence"))
    uncalibrated.encoder.set_rule_keep(torch.ones(2, T, dtype=torch.bool))
    with pytest.raises(ValueError, match="never calibrated"):  # never a silent zero fill
        uncalibrated.encoder(mel)


def attention_reference(plain, mel, block: int, keep: float):
    """Early Attentive Sparsification written out: blocks before `block` on every frame; at it,
    softmax(q k^T / sqrt(Dh)) of its attention on attn_ln(x), the mean over heads and queries, the
    round(keep * T) highest in order; that block and the later ones on those frames only."""
    x = embed(plain, mel)
    kept = None
    for index, b in enumerate(plain.encoder.blocks):
        if index == block - 1:
            h = b.attn_ln(x)
            heads = b.attn.n_head
            q = b.attn.query(h).unflatten(-1, (heads, -1)).transpose(1, 2)
            k = b.attn.key(h).unflatten(-1, (heads, -1)).transpose(1, 2)
            probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # (B, H, T, T)
            received = probs.mean(dim=(1, 2))
            count = max(1, round(keep * x.shape[1]))
            kept = torch.stack([torch.tensor(sorted(r.argsort(descending=True)[:count].tolist())) for r in received])
            x = torch.stack([x[i, kept[i]] for i in range(x.shape[0])])
        x = b(x)
    return plain.encoder.ln_post(x), kept


@pytest.mark.parametrize("block,keep", [(1, 0.5), (2, 0.25), (2, 0.9)])
def test_attention_rule_keeps_the_top_attended_frames_in_order(block, keep):
    plain = tiny_whisper()
    model = gate_whisper_rule(copy.deepcopy(plain), Rule("attention", block, keep))
    mel, tokens = inputs(B=3)
    with torch.no_grad():
        got = model.encoder(mel)
        want, kept = attention_reference(plain, mel, block, keep)
    assert torch.equal(model.encoder.kept_frames, kept)
    assert got.shape == (3, round(keep * T), DIMS.n_audio_state)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the decoder's cross-attention sees the kept frames only: openai-whisper's own decoder on them
    with torch.no_grad():
        torch.testing.assert_close(model.decoder(tokens, got), plain.decoder(tokens, want), rtol=1e-4, atol=1e-4)
    record = model.encoder.last_record
    for index in range(DIMS.n_audio_layer):
        share = float(record.masks[f"encoder.{index}.mlp"].mean())
        assert share == (1.0 if index < block - 1 else pytest.approx(round(keep * T) / T))


def test_attention_rule_keeping_everything_is_openai_whisper_bit_for_bit():
    plain = tiny_whisper()
    mel, _ = inputs(B=2)
    for block in (1, 2):
        model = gate_whisper_rule(copy.deepcopy(plain), Rule("attention", block, 1.0))
        with torch.no_grad():
            assert torch.equal(model.encoder(mel), plain.encoder(mel))


def test_frame_kinds_and_sparsity_by_kind():
    # clip 0: 0.5 s of audio (25 frames of 20 ms) with speech in [0.1, 0.2) s and [0.3 s, ...);
    # clip 1: no audio frame beyond 2 frames, one region covering it
    kinds = frame_kinds([8000, 640], [[(1600, 3200), (4800, 8000)], [(0, 640)]], frames=30)
    assert kinds[0, :5].tolist() == [SILENCE] * 5 and kinds[0, 5:10].tolist() == [SPEECH] * 5
    assert kinds[0, 10:15].tolist() == [SILENCE] * 5 and kinds[0, 15:25].tolist() == [SPEECH] * 10
    assert kinds[0, 25:].tolist() == [PADDING] * 5
    assert kinds[1, :2].tolist() == [SPEECH] * 2 and (kinds[1, 2:] == PADDING).all()
    edge = frame_kinds([8000], [[(1601, 1602)]], frames=30)  # a region inside one frame marks that frame
    assert (edge[0] == SPEECH).nonzero().flatten().tolist() == [5]
    record = GateRecord()
    keep = kinds == SPEECH  # the silence rule's frames, then one speech frame of clip 0 skipped in one module
    record.add("encoder.0.attn", keep.float())
    second = keep.clone()
    second[0, 5] = False
    record.add("encoder.0.mlp", second.float())
    shares = sparsity_by_kind(record, kinds)
    assert shares["padding"] == 1.0 and shares["silence"] == 1.0
    assert shares["speech"] == pytest.approx(1 / (2 * 17))  # 17 speech frames, 2 modules
    assert sparsity_by_kind(record, torch.full_like(kinds, SPEECH))["padding"] is None


@pytest.mark.parametrize("text,match", [("attention:0:0.5", "block must be an integer >= 1"),
                                        ("attention:3:1.5", r"keep must lie in \(0, 1\]"),
                                        ("attention:3", "a rule is padding"),
                                        ("padding:3:0.5", "a rule is padding"),
                                        ("silence:-2", "margin must be an integer >= 0"),
                                        ("padding:x", "integers for BLOCK and MARGIN"),
                                        ("attention:x:0.5", "integers for BLOCK and MARGIN")])
def test_bad_rule_settings(text, match):
    with pytest.raises(ValueError, match=match):
        parse_rule(text)


def test_rule_label_names_settings_other_than_the_defaults():
    assert parse_rule("attention").label == "attention" == parse_rule("attention:3:0.5").label
    assert parse_rule("attention:2:0.75").label == "attention-k2-0.75"
    assert parse_rule("padding").label == "padding" and parse_rule("silence:25").label == "silence-m25"


def test_rule_margins_keep_frames_beside_the_audio_and_the_speech():
    kinds = frame_kinds([3200], [[(640, 1280)]], frames=20)  # 10 frames of audio, speech in frames 2-3
    assert rule_keep(parse_rule("padding"), kinds)[0].nonzero().flatten().tolist() == list(range(10))
    assert rule_keep(parse_rule("padding:2"), kinds)[0].nonzero().flatten().tolist() == list(range(12))
    assert rule_keep(parse_rule("silence"), kinds)[0].nonzero().flatten().tolist() == [2, 3]
    assert rule_keep(parse_rule("silence:1"), kinds)[0].nonzero().flatten().tolist() == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def real_manifest(real_speech, tmp_path_factory):
    """The real English and Italian clips as a demo-corpus manifest: half train, half test."""
    from tests.test_whisper_train import TEXTS

    root = tmp_path_factory.mktemp("rules_corpus")
    lines = []
    for i, item in enumerate(real_speech):
        sf.write(root / f"{item['id']}.wav", item["wav"], SAMPLE_RATE)
        lines.append({"id": item["id"], "audio": f"{item['id']}.wav", "language": item["language"],
                      "speaker": item["speaker"], "text": TEXTS[item["id"].split("_", 1)[1]][item["language"]],
                      "split": "train" if i % 2 else "test", "translations": {}})
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "manifest.jsonl"


def test_rules_decode_real_speech(whisper_base, real_manifest, tmp_path, monkeypatch):
    """`localgp decode --model whisper-base --gates RULE` on real clips with the real weights: the
    padding rule skips every padding frame and no speech and transcribes as the dense model does;
    the attention rule at keep 1.0 decodes token for token as dense; the fill is cached."""
    from localgp.decode import decode_run

    monkeypatch.setattr("localgp.backbones.whisper.backbone.WhisperBaseBackbone.directory", lambda self: whisper_base)
    common = dict(model="whisper-base", data=str(real_manifest), whisper_dir=str(whisper_base), tasks=("asr",),
                  batch_size=4, options=None)
    dense = decode_run(None, tmp_path / "dense.jsonl", **common)
    padding = decode_run(None, tmp_path / "padding.jsonl", gates="padding", **common)
    assert list((whisper_base / "skip-values").glob("*.pt"))  # calibrated once, cached beside the weights
    full = decode_run(None, tmp_path / "full.jsonl", gates="attention:2:1.0", **common)
    half = decode_run(None, tmp_path / "half.jsonl", gates="attention:3:0.5", **common)
    assert [r.hypothesis for r in full] == [r.hypothesis for r in dense]
    same = sum(p.hypothesis == d.hypothesis for p, d in zip(padding, dense))
    assert same >= len(dense) - 1, [(p.hypothesis, d.hypothesis) for p, d in zip(padding, dense)]
    for r in padding:
        assert r.frames_skipped["padding"] == 1.0 and r.frames_skipped["speech"] == 0.0
        assert r.encoder_gflops < 0.6 * dense[0].encoder_gflops
    for r in half:
        assert r.encoder_sparsity == pytest.approx(0.5 * 4 / 6, abs=1e-3)  # blocks 3..6 of 6 on half the frames
    assert json.loads((tmp_path / "padding.jsonl.source.json").read_text())["model"]["gates"] == "padding"


@pytest.fixture(scope="module")
def tiny_whisper_dir(tmp_path_factory):
    from tests.test_longform import save_tiny_whisper

    return save_tiny_whisper(tmp_path_factory.mktemp("tiny_rules_whisper"))


def test_rule_user_errors(tiny_whisper_dir, tmp_path, cli_error):
    sf.write(tmp_path / "a.wav", torch.zeros(16000).numpy(), SAMPLE_RATE)
    cli_error(["transcribe", tmp_path / "a.wav", "--gates", "attention:9:0.5", "--whisper-dir", tiny_whisper_dir],
              "block must be at most the encoder's 1 blocks")
    cli_error(["transcribe", tmp_path / "a.wav", "--gates", "attention:2:1.5", "--whisper-dir", tiny_whisper_dir],
              r"keep must lie in \(0, 1\]")
    cli_error(["transcribe", tmp_path / "a.wav", "--gates", "padding", "--whisper-dir", tiny_whisper_dir,
               "--calibration", tmp_path / "none.jsonl"], "none.jsonl does not exist")
    cli_error(["transcribe", tmp_path / "a.wav", "--calibration", tmp_path / "none.jsonl"],
              "--calibration goes with --gates padding or silence")
    cli_error(["decode", "--model", "whisper-base", "--data", tmp_path / "m.jsonl", "--out", tmp_path / "o.jsonl",
               "--gates", "attention:1:0"], r"keep must lie in \(0, 1\]")


def test_transcribe_computes_the_speaker_once_per_recording(tiny_whisper_dir, real_speech, tmp_path, monkeypatch):
    """A gated run with a speaker context: its extractor runs once per file, on the file's speech,
    however many windows the file has; the time it takes is the result's context_seconds."""
    import numpy as np

    from localgp.context import feeder
    from localgp.longform import pipeline
    from tests.test_longform import train_tiny_run

    root = train_tiny_run(tmp_path, tiny_whisper_dir, real_speech,
                          {"encoder": "temporal", "contexts": [["front", 0], ["speaker", 256]]},
                          context_extractors={"speaker": {"kind": "resemblyzer"}})
    calls = []
    real_build = feeder.build_extractor

    def counting(spec):
        extractor = real_build(spec)
        inner = extractor.__call__

        class Counted:
            size = extractor.size

            def __call__(self, wav):
                calls.append(len(wav))
                return inner(wav)

        return Counted()

    monkeypatch.setattr(feeder, "build_extractor", counting)
    clips = [item["wav"] for item in real_speech]
    pause = np.zeros(31 * SAMPLE_RATE, np.float32)  # > 30 s: every clip its own window
    files = []
    for n, parts in enumerate([[clips[0], pause, clips[1], pause, clips[2]], [clips[3], pause, clips[4]]]):
        files.append(tmp_path / f"talk{n}.wav")
        sf.write(files[-1], np.concatenate(parts), SAMPLE_RATE)
    result = pipeline.transcribe(files, str(root), language="en", beam=1, batch=2, device="cpu", progress=False)
    assert [len(t.segments) for t in result.transcripts] == [3, 2]
    assert len(calls) == 2  # once per recording, not per window
    speech = [sum(len(c) for c in clips[:3]), sum(len(c) for c in clips[3:5])]
    for got, clip_samples in zip(calls, speech):  # from the recording's speech (VAD regions), not its pauses
        assert clip_samples * 0.8 < got < clip_samples + 6 * 0.4 * SAMPLE_RATE
    assert result.context_seconds > 0 and result.encoder_seconds > 0 and result.decoder_seconds > 0
    assert result.context_seconds + result.encoder_seconds + result.decoder_seconds <= result.seconds


def test_context_speech_is_the_first_seconds_of_the_speech():
    import numpy as np

    from localgp.longform.pipeline import context_speech

    wav = np.arange(100 * SAMPLE_RATE, dtype=np.float32)
    regions = [(0, 20 * SAMPLE_RATE), (30 * SAMPLE_RATE, 50 * SAMPLE_RATE), (60 * SAMPLE_RATE, 70 * SAMPLE_RATE)]
    got = context_speech(wav, regions, seconds=30.0)
    want = np.concatenate([wav[: 20 * SAMPLE_RATE], wav[30 * SAMPLE_RATE : 40 * SAMPLE_RATE]])
    assert np.array_equal(got, want)
    assert np.array_equal(context_speech(wav, regions[:1], seconds=30.0), wav[: 20 * SAMPLE_RATE])


def test_bench_runs_the_rules_in_the_bench_dtype(whisper_base, real_manifest, monkeypatch):
    """`localgp bench --providers padding --dtype int8`: the rule's model runs in --dtype as the
    other localgp rows do (its linears through the int8 packing, none in float32)."""
    from localgp import bench
    from localgp.model import packed

    monkeypatch.setattr("localgp.backbones.whisper.backbone.WhisperBaseBackbone.directory", lambda self: whisper_base)
    used = set()
    real = packed.linear
    monkeypatch.setattr(packed, "linear", lambda x, w, b, cache: used.add(cache.precision) or real(x, w, b, cache))
    setting = bench.Setting(backbone="whisper-base", batch=2, audio=str(real_manifest), weights=str(whisper_base),
                            dtype="int8")
    rows = bench.run_bench("encoder", setting, ["padding"], keeps=[1.0], repeats=1, warmup=0)
    by = {r["provider"]: r for r in rows}
    assert {"dense", "masked", "padding"} <= set(by) and used == {"int8"}
    assert by["padding"]["gflops"] < 0.7 * by["dense"]["gflops"]
