"""Whisper base as a training backbone, on real clips with the real pretrained weights: gates
trained with the backbone frozen and distillation from the dense model, checkpoints that hold
only the trained state and resume exactly, corpus decoding of a run (resumable) and of the plain
model (zero-shot), and scoring with Whisper's normalizers."""

import dataclasses
import json

import pytest
import soundfile as sf
import torch

from localgp.backbones.whisper.decoding import WhisperDecodeOptions
from localgp.evaluate import Decoded, read_decoded, score, write_report
from localgp.runs import load_trained
from localgp.train_config import TrainConfig
from localgp.train import Trainer

# Texts of the real clips (conftest's REAL_PROMPTS), parallel across the two languages.
TEXTS = {
    "agent-newlocation": {"en": "Please enter a new extension, followed by pound.",
                          "it": "Prego digitare un nuovo interno seguito da cancelletto."},
    "conf-onlyperson": {"en": "You are currently the only person in this conference.",
                        "it": "Attualmente sei l'unica persona in questa conferenza."},
    "pbx-invalid": {"en": "I'm sorry, that's not a valid extension. Please try again.",
                    "it": "Mi dispiace, interno non valido. Prego riprovare."},
}
OPTIONS = WhisperDecodeOptions(beam_size=2, sample_len=30)  # short searches whatever barely trained gates do


@pytest.fixture(scope="module")
def manifest(real_speech, tmp_path_factory):
    """Six real clips (en, it): pbx-invalid is the test split, the rest train; each clip carries
    the other language's text as its translation."""
    root = tmp_path_factory.mktemp("whisper_corpus")
    lines = []
    for item in real_speech:
        language, prompt = item["language"], item["id"].split("_", 1)[1]
        other = "it" if language == "en" else "en"
        path = root / "audio" / f"{item['id']}.wav"
        path.parent.mkdir(exist_ok=True)
        sf.write(path, item["wav"], 16000)
        lines.append({"id": item["id"], "audio": f"audio/{path.name}", "language": language,
                      "text": TEXTS[prompt][language], "speaker": item["speaker"],
                      "split": "test" if prompt == "pbx-invalid" else "train",
                      "translations": {other: TEXTS[prompt][other]}})
    (root / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "manifest.jsonl"


def whisper_config(root, name, manifest, whisper_base, **overrides):
    base = dict(out_dir=str(root / name), backbone="whisper-base", whisper_dir=str(whisper_base),
                data={"kind": "manifest", "path": str(manifest), "split": "train"},
                gates={"encoder": "temporal", "decoder": "token", "contexts": [["front", 0], ["speaker", 256]]},
                context_extractors={"speaker": {"kind": "resemblyzer"}}, tasks=("asr", "st"), batch_size=1,
                lr=1e-2, warmup_steps=1, max_steps=2, target_sparsity=0.5, distill_weight=1.0, log_every=1,
                save_every=1)
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def runs(manifest, whisper_base, tmp_path_factory):
    """Two steps straight ("a"), and one step, a new process' resume and the second step ("b")."""
    root = tmp_path_factory.mktemp("whisper_runs")
    straight = Trainer(whisper_config(root, "a", manifest, whisper_base))
    straight.train()
    interrupted = Trainer(whisper_config(root, "b", manifest, whisper_base))
    interrupted.train(steps=1)
    resumed = Trainer(whisper_config(root, "b", manifest, whisper_base))
    assert resumed.step == 1
    resumed.train()
    return root, straight, resumed


@pytest.fixture(scope="module")
def base_state(whisper_base):
    from localgp.backbones.whisper.weights import load_whisper

    return load_whisper(whisper_base).float().state_dict()


def test_examples_are_whisper_tasks(runs):
    _, trainer, _ = runs
    tasks = sorted((e.utterance.language, e.target_language) for e in trainer.examples)
    assert tasks == [("en", "en"), ("en", "en"), ("it", "en"), ("it", "en"), ("it", "it"), ("it", "it")]  # no en->it


def test_backbone_frozen_gates_trained_distillation_logged(runs, base_state):
    root, trainer, _ = runs
    state = trainer.model.state_dict()
    for key, value in base_state.items():
        assert torch.equal(state[key], value), key  # Whisper's own weights are untouched
    torch.manual_seed(0)  # the gates as the run initialised them: same seed, same config
    fresh, _ = trainer.backbone.build()
    gates = {k: v for k, v in fresh.state_dict().items() if "pruning." in k}
    assert gates and any(not torch.equal(state[k], v) for k, v in gates.items())
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == set(trainer.trainable) and trainable <= set(gates)
    rows = [json.loads(line) for line in (root / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["distill"] > 0 and r["loss"] > 0 and 0 <= r["sparsity"] <= 1 for r in rows)
    assert {"encoder.attn", "encoder.mlp", "decoder.self_attn", "decoder.src_attn", "decoder.ffn"} == set(
        rows[-1]["sparsity_per_module"])


def test_checkpoint_holds_the_trained_state_only_and_resume_is_exact(runs, base_state, whisper_base):
    root, straight, resumed = runs
    checkpoint = torch.load(root / "a" / "checkpoint.pth", weights_only=False)
    assert checkpoint["weights"]["model"] == "whisper-base"
    manifest = json.loads((whisper_base / "manifest.json").read_text())
    assert checkpoint["weights"]["base.pt sha256"] == manifest["files"]["base.pt"]["sha256"]
    assert checkpoint["model"] and all("pruning." in k for k in checkpoint["model"])
    backbone_bytes = sum(v.numel() * v.element_size() for v in base_state.values())
    assert (root / "a" / "checkpoint.pth").stat().st_size < backbone_bytes  # the 74M frozen weights are not in it
    for (name, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_a_run_loads_back(runs):
    root, trainer, _ = runs
    model, tokenizer, config = load_trained(root / "a")
    assert config.backbone == "whisper-base" and tokenizer.sot == 50258 and not model.training
    for (name, p), q in zip(trainer.model.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    (root / "c").mkdir()  # the same gates on other backbone weights are refused
    state = torch.load(root / "a" / "checkpoint.pth", weights_only=False)
    state["weights"] = {**state["weights"], "base.pt sha256": "0" * 64}
    torch.save(state, root / "c" / "checkpoint.pth")
    with pytest.raises(ValueError, match="trained on backbone weights"):
        load_trained(root / "c")


def test_mean_fill_is_calibrated_at_a_fresh_start_kept_on_resume_and_the_run_benchmarks(manifest, whisper_base,
                                                                                      tmp_path):
    """skip_fill "mean": the run's first start calibrates the skip values on its training clips (the
    mean module outputs at their padding), the checkpoint carries them, a resumed run does not
    recalibrate; `localgp bench --checkpoint` runs the trained gates on clips fed their speaker
    embeddings."""
    from localgp import bench
    from localgp.backbones.whisper.model import speech_frames

    gates = {"encoder": "temporal", "decoder": None, "contexts": [["front", 0], ["speaker", 256]], "inject": False,
             "skip_fill": "mean", "attention_keys": "all", "context_frames": 8, "predictor_width": 64}
    cfg = whisper_config(tmp_path, "mean", manifest, whisper_base, max_steps=1, gates=gates)
    trainer = Trainer(cfg)
    values = trainer.model.encoder.pruning.skip_values
    train_clips = {e.utterance.id: e.utterance for e in trainer.examples}
    assert values.clips == len(train_clips) == 4
    # the last frames are padding in every clip: there the table is the mean over all clips
    backbone, model = trainer.backbone, trainer.model.encoder
    waves = [u.load() for u in train_clips.values()]
    assert all(speech_frames(len(w)) < 1490 for w in waves)
    outputs = []
    hook = model.blocks[-1].mlp.register_forward_hook(lambda m, i, o: outputs.append(o))
    with torch.no_grad():
        model.execution = "dense"
        model(backbone.mel(waves))
    hook.remove()
    model.execution = "masked"
    torch.testing.assert_close(values.values[-1, 1, -10:], outputs[0][:, -10:].mean(0), rtol=1e-4, atol=1e-4)
    trainer.train()
    table = values.values.clone()
    with torch.no_grad():
        values.values.zero_()  # a resume must load them, not recalibrate
    resumed = Trainer(dataclasses.replace(cfg, max_steps=2))
    assert resumed.step == 1 and resumed.model.encoder.pruning.skip_values.clips == 4
    assert torch.equal(resumed.model.encoder.pruning.skip_values.values, table)
    rows = bench.run_bench("encoder", bench.Setting(backbone="whisper-base", batch=1, checkpoint=cfg.out_dir,
                                                    audio=str(manifest)),
                           ["dense", "compact"], keeps=[], repeats=1, warmup=0)
    by = {r["provider"]: r for r in rows}
    assert by["compact"]["masks"] == "gates" and 0 < by["compact"]["kept_share"] <= 1


def test_no_distillation_when_every_gate_keeps_and_unfrozen_parameters_train(manifest, whisper_base, tmp_path):
    cfg = whisper_config(tmp_path, "keep", manifest, whisper_base, max_steps=1, unfreeze=["decoder.ln."],
                         gates={"encoder": "temporal", "decoder": "token"}, context_extractors={})
    trainer = Trainer(cfg)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if name.endswith("to_logits.bias"):
                p.view(-1, 2).copy_(torch.tensor([-50.0, 50.0]))  # keep, whatever the Gumbel noise
    before = trainer.model.decoder.ln.weight.detach().clone()
    row = trainer.train()
    assert row["sparsity"] == 0 and row["distill"] == pytest.approx(0, abs=1e-6)
    assert not torch.equal(trainer.model.decoder.ln.weight, before)
    saved = torch.load(tmp_path / "keep" / "checkpoint.pth", weights_only=False)["model"]
    assert {"decoder.ln.weight", "decoder.ln.bias"} <= set(saved)
    assert not any(k.startswith("encoder.blocks.") and "pruning." not in k for k in saved)


def test_backbone_lr_is_the_unfrozen_parameters_own_peak_and_survives_a_resume(manifest, whisper_base, tmp_path):
    from localgp.train import warmup_lr

    cfg = whisper_config(tmp_path, "two", manifest, whisper_base, max_steps=1, unfreeze=["decoder.ln."], backbone_lr=1e-6,
                         warmup_steps=2, gates={"encoder": "temporal", "decoder": None, "contexts": [["front", 0]]},
                         context_extractors={}, tasks=("asr",))
    trainer = Trainer(cfg)
    trainer.train()
    gates, backbone = trainer.optimizer.param_groups
    assert (gates["peak"], backbone["peak"]) == (cfg.lr, 1e-6)
    assert {id(p) for p in backbone["params"]} == {id(trainer.model.decoder.ln.weight), id(trainer.model.decoder.ln.bias)}
    assert backbone["lr"] == pytest.approx(warmup_lr(1, 1e-6, 2)) and gates["lr"] == pytest.approx(warmup_lr(1, cfg.lr, 2))
    resumed = Trainer(dataclasses.replace(cfg, max_steps=2))  # from step 1's checkpoint
    assert resumed.step == 1 and [g["peak"] for g in resumed.optimizer.param_groups] == [cfg.lr, 1e-6]
    resumed.train()
    assert resumed.optimizer.param_groups[1]["lr"] == pytest.approx(1e-6)  # step 2: the peak


def test_decode_a_run_records_the_whisper_measurements_and_resumes(runs, tmp_path):
    from localgp.decode import decode_run

    root, _, _ = runs
    out = tmp_path / "decoded.jsonl"
    first = decode_run(root / "a", out, options=OPTIONS, batch_size=2, limit=1)
    assert len(first) == 1
    records = decode_run(root / "a", out, options=OPTIONS, batch_size=2)
    assert sorted(r.id for r in records) == ["en_pbx-invalid:en", "it_pbx-invalid:en", "it_pbx-invalid:it"]
    assert records[0].id == first[0].id
    for r in records:
        assert r.normalizer == "whisper" and r.decoder_gflops > 0 and 0 < r.encoder_seconds < r.seconds
        assert 0 < r.encoder_gflops <= 43.8  # at most the dense window's 43.73 GMACs
        assert 0 <= r.encoder_sparsity <= 1 and 0 <= r.encoder_speech_sparsity <= 1
        assert {"encoder.attn", "encoder.mlp", "decoder.self_attn", "decoder.src_attn", "decoder.ffn"} == set(r.sparsity)
        assert len(r.tokens) == len(r.src_attn_keep)
    report = score(records)
    assert set(report["wer"]) == {"en", "it", "average"} and set(report["bleu"]) == {"it-en", "average"}
    assert report["normalizers"] == ["whisper"] and report["decoder_gflops"] > 0
    assert 0 <= report["encoder_speech_sparsity"] <= 1
    write_report(report, tmp_path / "report")
    json.loads((tmp_path / "report" / "report.json").read_text(),
               parse_constant=lambda c: pytest.fail(f"report.json holds {c}"))


def test_dense_zero_shot_decode(manifest, whisper_base, tmp_path, cli_error):
    from localgp.cli import main

    out = tmp_path / "dense.jsonl"
    assert main(["decode", "--model", "whisper-base", "--data", str(manifest), "--whisper-dir", str(whisper_base),
                 "--out", str(out), "--beam", "2", "--tasks", "asr"]) == 0
    records = read_decoded(out)
    assert sorted(r.id for r in records) == ["en_pbx-invalid:en", "it_pbx-invalid:it"]
    for r in records:
        assert r.encoder_gflops == pytest.approx(43.73, abs=0.01) and r.sparsity == {} and r.tokens == []
        assert r.encoder_sparsity is None and r.decoder_gflops > 0 and r.normalizer == "whisper"
    english = next(r for r in records if r.language == "en")
    assert "valid extension" in english.hypothesis  # the real model hears the real clip
    cli_error(["decode", "somewhere", "--model", "whisper-base", "--data", manifest, "--out", out], "not both")
    cli_error(["decode", "--model", "whisper-base", "--out", out], "--model needs --data")
    cli_error(["decode", "--model", "whisper-base", "--data", manifest, "--whisper-dir", whisper_base,
               "--out", tmp_path / "x.jsonl", "--ctc-weight", "0.3"], "ctc_weight do not apply to Whisper")


# ------------------------------------------------------------------ no model needed

def decoded(language, target, reference, hypothesis, normalizer="whisper", **extra):
    return Decoded(f"{language}-{target}-{reference}", language, target, reference, hypothesis, 40.0, 1.0,
                   normalizer=normalizer, **extra)


def test_whisper_normalizers_in_wer():
    assert score([decoded("en", "en", "Hello, World!", "hello world")])["wer"]["en"] == 0
    assert score([decoded("en", "en", "It's 10 dollars.", "it is $10")])["wer"]["en"] == 0  # English's own rules
    assert score([decoded("it", "it", "Prego, riprovare!", "prego riprovare")])["wer"]["it"] == 0
    # OWSM's records keep localgp's own normalisation (and their numbers)
    assert score([decoded("en", "en", "It's 10 dollars.", "it is $10", "localgp")])["wer"]["en"] > 0


def test_old_records_read_and_report_has_no_nan(tmp_path):
    old = {"id": "u", "language": "de", "target_language": "de", "reference": "guten tag", "hypothesis": "guten tag",
           "encoder_gflops": 1.0, "seconds": 0.1, "sparsity": {}, "tokens": [], "src_attn_keep": []}
    record = Decoded.from_json(json.dumps(old))
    assert record.decoder_gflops is None and record.normalizer == "localgp"
    with pytest.raises(ValueError, match="field 'decoder_gflops' must be"):
        Decoded.from_json(json.dumps({**old, "decoder_gflops": "fast"}))
    report = score([record, dataclasses.replace(record, id="v", encoder_sparsity=0.25)])
    assert report["decoder_gflops"] is None and "decoder_gflops" in report["notes"]
    assert report["encoder_sparsity"] == 0.25 and "1 of 2" in report["notes"]["encoder_sparsity"]
    report["training"] = {"loss": float("nan")}
    write_report(report, tmp_path)
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text and json.loads(text)["training"]["loss"] is None
    assert "training.loss" in json.loads(text)["notes"]


@pytest.mark.parametrize("overrides, message", [
    ({"backbone_lr": 0}, "backbone_lr must be a positive number"),
    ({"backbone": "whisper-large"}, "TrainConfig.backbone must be one of"),
    ({"distill_weight": -1.0}, "TrainConfig.distill_weight must be a number >= 0"),
    ({"distill_weight": "1"}, "TrainConfig.distill_weight must be a number"),
    ({"distill_temperature": 0}, "TrainConfig.distill_temperature must be a number > 0"),
    ({"freeze_backbone": "yes"}, "TrainConfig.freeze_backbone must be true, false or null"),
    ({"unfreeze": "decoder."}, "TrainConfig.unfreeze must be a list"),
    ({"unfreeze": ["decoder."], "freeze_backbone": False}, "TrainConfig.unfreeze: the backbone is not frozen"),
    ({"whisper_dir": 3}, "TrainConfig.whisper_dir must be a directory"),
    ({"backbone": "owsm", "whisper_dir": "w"}, "TrainConfig.whisper_dir only applies"),
    ({"init": "snapshot"}, "TrainConfig.init is an OWSM snapshot"),
    ({"target_sparsity": 1.5}, "TrainConfig.target_sparsity must lie in"),
    ({"lr": "1e-3"}, "TrainConfig.lr must be a number > 0"),
    ({"batch_size": 0}, "TrainConfig.batch_size must be a positive integer"),
    ({"join_clips": 1.5}, "TrainConfig.join_clips must be a share in"),
    ({"gates": {"encoder": "temporal", "skip_fill": "median"}}, "skip_fill must be 'zero' or 'mean'"),
])
def test_config_fields_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"out_dir": "x", "backbone": "whisper-base", **overrides})


def test_unknown_unfreeze_prefix_is_named(manifest, whisper_base, tmp_path):
    with pytest.raises(ValueError, match="'encoder.blockz.' is the prefix of no parameter"):
        Trainer(whisper_config(tmp_path, "u", manifest, whisper_base, unfreeze=["encoder.blockz."]))


def test_yaml_config(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text("out_dir: x\nbackbone: whisper-base\nunfreeze: [decoder.ln.]\ndistill_weight: 1.0\n"
                    "tasks: [asr, st]\n")
    cfg = TrainConfig.from_yaml(path)
    assert cfg.unfreeze == ("decoder.ln.",) and cfg.frozen and cfg.tasks == ("asr", "st")
    assert not TrainConfig(out_dir="x").frozen  # OWSM: everything trains, as before
