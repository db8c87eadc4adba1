"""Bad input never passes silently (issue 15), met where users meet it: the command line. A user
error exits with 2 and one line `localgp <command>: error: ...` (the cli_error fixture checks
both), and nothing is written or lost."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from localgp import flops
from localgp.cli import main
from localgp.evaluate import Decoded, append_decoded, read_decoded
from localgp.train_config import TrainConfig
from tests.test_train import config


def write_config(path, cfg: TrainConfig | dict, **changes):
    """A YAML config file of `cfg` (a TrainConfig or its fields) with `changes`."""
    fields = dataclasses.asdict(cfg) if isinstance(cfg, TrainConfig) else dict(cfg)
    path.write_text(yaml.safe_dump(json.loads(json.dumps({**fields, **changes}))))
    return path


def files_under(path) -> dict:
    """{relative path: bytes} of every file under `path`: what a refused command must leave alone."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict readers do."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny trained run (8 utterances of de and fr, kaldi layout), 2 steps."""
    from localgp.train import Trainer

    tmp = tmp_path_factory.mktemp("bad_input")
    Trainer(config(tmp, max_steps=2, save_every=2, log_every=1)).train()
    return tmp / "run"


DECODE = ["--beam", "2", "--maxlenratio", "-3", "--batch", "4"]


# ------------------------------------------------------------------ audio that cannot be used

def spoil(folder):
    """Five ways audio cannot be used, in a kaldi corpus written by write_kaldi: {utterance: file}."""
    bad = {"de0": folder / "de" / "de0.wav", "de1": folder / "de" / "de1.wav", "fr0": folder / "fr" / "fr0.wav",
           "fr1": folder / "fr" / "fr1.wav", "fr2": folder / "fr" / "fr2.wav"}
    sf.write(bad["de0"], np.zeros(800, np.float32), 16000)  # 0.05 s
    sf.write(bad["de1"], np.zeros(0, np.float32), 16000)  # no sample
    bad["fr0"].write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage")  # undecodable
    data = bad["fr1"].read_bytes()
    bad["fr1"].write_bytes(data[: len(data) // 2])  # cut short: the header declares twice as much
    wav, _ = sf.read(bad["fr2"], dtype="float32")
    wav[100] = np.nan
    sf.write(bad["fr2"], wav, 16000, subtype="FLOAT")  # a float file with a NaN sample
    return bad


def test_training_refuses_unusable_audio_listing_every_file_or_skips_it_when_asked(tmp_path, cli_error, caplog):
    cfg = config(tmp_path, max_steps=1, save_every=1)
    bad = spoil(tmp_path / "data_run")
    line = cli_error(["train", write_config(tmp_path / "c.yaml", cfg)], "5 of 8 utterances have audio that cannot "
                                                                         "be used")
    for uid, path in bad.items():
        assert f"{uid}: " in line and str(path) in line
    assert "shorter than 0.1 s" in line and "cut short" in line and "cannot decode" in line and "NaN" in line
    assert not (tmp_path / "run").exists()  # refused before anything was written

    caplog.set_level("WARNING")
    assert main(["train", str(write_config(tmp_path / "skip.yaml", cfg, skip_bad_audio=True))]) == 0
    warning = next(r.getMessage() for r in caplog.records if "left out" in r.getMessage())
    assert "left out 5 of 8 utterances" in warning and all(str(path) in warning for path in bad.values())


def test_decoding_refuses_unusable_audio_or_skips_it_when_asked(run_dir, tmp_path, cli_error):
    from localgp.runs import load_run

    corpus = load_run(run_dir).config.data["dirs"]["fr"]
    clip = f"{corpus}/fr3.wav"
    kept = open(clip, "rb").read()
    out = tmp_path / "decoded.jsonl"
    try:
        sf.write(clip, np.zeros(800, np.float32), 16000)
        cli_error(["decode", run_dir, "--out", out, *DECODE], r"1 of 8 utterances .*fr3.wav.*0\.050 s, shorter than")
        assert not out.exists()
        assert main(["decode", str(run_dir), "--out", str(out), *DECODE, "--skip-bad-audio"]) == 0
    finally:
        open(clip, "wb").write(kept)
    ids = {r.id for r in read_decoded(out)}
    assert len(ids) == 7 and "fr3:fr" not in ids


def test_a_clip_too_short_for_the_subsampling_counts_no_negative_work(cli_error):
    assert flops.subsampled_frames(1) == 0 and flops.subsampled_frames(7) == 1
    shape = flops.EncoderShape.of_preset("tiny")
    assert all(v >= 0 for v in flops.encoder_macs(shape, flops.input_frames(0.02)).values())
    cli_error(["flops", "--seconds", "0.02"], "too short for the conv2d subsampling")


def test_the_mask_figure_refuses_an_empty_file(run_dir, tmp_path, cli_error):
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    cli_error(["analyze", "masks", "--checkpoint", run_dir, "--audio", tmp_path / "empty.wav", "--out",
               tmp_path / "m.png"], r"empty.wav: 0\.000 s, shorter than 0.1 s")
    assert not (tmp_path / "m.png").exists()


# ------------------------------------------------------------------ configs

@pytest.mark.parametrize("changes, message", [
    ({"batch_size": "two"}, "TrainConfig.batch_size must be a positive integer, got 'two'"),
    ({"batch_size": 2.5}, "TrainConfig.batch_size must be a positive integer, got 2.5"),
    ({"max_steps": True}, "TrainConfig.max_steps must be a positive integer"),
    ({"gates": "temporal"}, "TrainConfig.gates must be a mapping"),
    ({"gates": {"encoder": "temporal", "heads": 2.5}}, "TrainConfig.gates.heads must be int, got 2.5"),
    ({"gates": {"encoder": "frames"}}, "TrainConfig.gates: GateConfig.encoder must be one of"),
    ({"gates": {"encoder": "temporal", "tau": float("nan")}}, "TrainConfig.gates: GateConfig.tau must be positive and finite, got nan"),
    ({"gates": {"encoder": "temporal", "heads": 0}}, "TrainConfig.gates: GateConfig.heads must be at least 1, got 0"),
    ({"gates": {"encoder": "temporal", "contexts": [["speaker"]]}}, "TrainConfig.gates.contexts must be a list of"),
    ({"data": {"kind": "manifest"}}, r"TrainConfig.data of kind 'manifest' needs \['path'\].*missing \['path'\]"),
    ({"data": {"kind": "manifest", "path": "m.jsonl", "splt": "dev"}}, r"unknown \['splt'\]"),
    ({"data": {"kind": "kaldi", "dirs": ["de"]}}, "TrainConfig.data.dirs must be a mapping"),
    ({"data": "data/demo"}, "TrainConfig.data must be a mapping"),
    ({"target_sparsity": 1.7}, r"TrainConfig.target_sparsity must lie in \[0, 1\], got 1.7"),
    ({"decoder_target_sparsity": -0.1}, r"TrainConfig.decoder_target_sparsity must lie in \[0, 1\] or be null"),
    ({"decoder_target_sparsity": 0.3, "gates": {"encoder": "temporal"}},
     r"TrainConfig.decoder_target_sparsity needs gates on the decoder"),
    ({"decoder_sparsity_weight": 10.0}, r"TrainConfig.decoder_sparsity_weight weighs the decoder's own target"),
    ({"decoder_sparsity_weight": -1, "decoder_target_sparsity": 0.3},
     r"TrainConfig.decoder_sparsity_weight must be a number >= 0 or null, got -1"),
    ({"lr": "fast"}, "TrainConfig.lr must be a number > 0, got 'fast'"),
    ({"lr": float("nan")}, "TrainConfig.lr must be a number > 0, got nan"),
    ({"grad_clip": float("inf")}, "TrainConfig.grad_clip must be a number > 0, got inf"),
    ({"tasks": "asr"}, "TrainConfig.tasks must be a non-empty subset"),
    ({"preset": "huge"}, "TrainConfig.preset must be one of"),
    ({"skip_bad_audio": "yes"}, "TrainConfig.skip_bad_audio must be true or false"),
    ({"context_extractors": {"speaker": "resemblyzer"}}, "TrainConfig.context_extractors must map"),
    ({"batchsize": 3}, r"unknown settings \['batchsize'\]"),
])
def test_config_fields_are_checked_before_anything_is_written(tmp_path, cli_error, changes, message):
    path = write_config(tmp_path / "c.yaml", config(tmp_path, max_steps=1), **changes)
    line = cli_error(["train", path], message)
    assert str(path) in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, message", [
    ("- out_dir: x\n", "expected a mapping of TrainConfig fields"),
    ("out_dir: [x\n", "is not valid YAML"),
    ("data: {kind: manifest, path: m.jsonl}\n", "TrainConfig.out_dir must be given"),
    ("out_dir: x\n", "TrainConfig.data.kind must be 'manifest', 'kaldi' or 'europarl', got None"),
])
def test_config_files_that_are_no_config(tmp_path, cli_error, text, message):
    (tmp_path / "c.yaml").write_text(text)
    cli_error(["train", tmp_path / "c.yaml"], message)
    assert not (tmp_path / "x").exists()


def test_a_vocab_size_the_corpus_cannot_fill_is_named_and_leaves_no_tokenizer(tmp_path, cli_error):
    cli_error(["train", write_config(tmp_path / "c.yaml", config(tmp_path, max_steps=1, vocab_size=5))],
              "vocab_size 5: sentencepiece cannot train on this corpus: Vocabulary size is smaller than")
    assert files_under(tmp_path / "run") == {}


def test_yaml_1_1_numbers_are_taken_as_the_numbers_meant(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out_dir: x\ndata: {kind: manifest, path: m.jsonl}\nlr: 1e-3\nmax_minutes: 2e1\n")
    cfg = TrainConfig.from_yaml(path)
    assert cfg.lr == 0.001 and cfg.max_minutes == 20.0


# ------------------------------------------------------------------ run directories

def test_a_rerun_with_another_config_is_refused_and_overwrite_starts_over(tmp_path, cli_error):
    from localgp.backbones.owsm.tokenizer import Tokenizer

    first = write_config(tmp_path / "a.yaml", config(tmp_path, max_steps=1, save_every=1, vocab_size=30))
    assert main(["train", str(first)]) == 0
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["vocab_size"] == 30
    before = files_under(run)
    second = write_config(tmp_path / "b.yaml", config(tmp_path, max_steps=1, save_every=1, vocab_size=45, lr=1e-3))
    cli_error(["train", second], r"holds a run of another config \(vocab_size: 30 -> 45; lr: 0.003 -> 0.001\).*"
                                 "--overwrite")
    assert files_under(run) == before
    # more steps is the same run, resumed
    assert main(["train", str(first), "--steps", "2"]) == 0
    assert json.loads((run / "config.json").read_text())["max_steps"] == 2
    assert main(["train", str(second), "--overwrite"]) == 0
    assert json.loads((run / "config.json").read_text())["vocab_size"] == 45
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1]
    assert Tokenizer.load(run / "tokenizer").processor.get_piece_size() == 45  # not the first run's 30


def test_a_failed_setup_leaves_no_tokenizer_for_another_config(tmp_path, cli_error):
    from localgp.backbones.owsm.tokenizer import Tokenizer

    typo = write_config(tmp_path / "a.yaml", config(tmp_path, max_steps=1, vocab_size=30, freeze_backbone=True,
                                                    unfreeze=["encoderz."]))
    cli_error(["train", typo], "'encoderz.' is the prefix of no parameter")
    run = tmp_path / "run"
    assert not (run / "config.json").exists() and not (run / "checkpoint.pth").exists()
    assert Tokenizer.load(run / "tokenizer").processor.get_piece_size() == 30  # written before the model's check
    fixed = write_config(tmp_path / "b.yaml", config(tmp_path, max_steps=1, save_every=1, vocab_size=45))
    assert main(["train", str(fixed)]) == 0
    assert Tokenizer.load(run / "tokenizer").processor.get_piece_size() == 45  # trained again, not reused


def test_a_resumed_run_logs_each_step_once(tmp_path):
    path = write_config(tmp_path / "c.yaml", config(tmp_path, max_steps=2, save_every=2, log_every=1))
    assert main(["train", str(path)]) == 0
    log = tmp_path / "run" / "log.jsonl"
    rows = log.read_text().splitlines()
    # killed after writing rows 3 and 4 (and half of 5) but before the checkpoint of step 4
    with open(log, "a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + json.dumps({"step": 4, "loss": 1.0}) + '\n{"step": 5, "lo')
    assert main(["train", str(path), "--steps", "4"]) == 0
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and log.read_text().splitlines()[:2] == rows
    assert json.loads(log.read_text().splitlines()[2])["loss"] != 1.0  # written by the resumed run


# ------------------------------------------------------------------ resumable decode outputs

def test_a_decode_resumes_only_what_the_same_model_and_options_produced(run_dir, tmp_path, cli_error):
    out = tmp_path / "decoded.jsonl"
    assert main(["decode", str(run_dir), "--out", str(out), *DECODE, "--limit", "3"]) == 0
    source = json.loads((tmp_path / "decoded.jsonl.source.json").read_text())
    assert source["options"]["beam_size"] == 2 and "checkpoint sha256" in source["model"]
    before = files_under(tmp_path)
    cli_error(["decode", run_dir, "--out", out, "--beam", "3", "--maxlenratio", "-3"],
              r"holds records of another decode \(options.beam_size: 2 -> 3\)")
    cli_error(["decode", run_dir, "--out", out, *DECODE, "--execution", "masked"],
              "options.execution: 'compact' -> 'masked'")
    assert files_under(tmp_path) == before
    # another run: same config, one more step
    other = tmp_path / "other"
    from localgp.runs import load_run

    assert main(["train", str(write_config(tmp_path / "o.yaml", load_run(run_dir).config, out_dir=str(other),
                                           max_steps=3))]) == 0
    cli_error(["decode", other, "--out", out, *DECODE], "model.checkpoint sha256: '[0-9a-f]{64}' -> '[0-9a-f]{64}'")
    assert {name: files_under(tmp_path)[name] for name in before} == before  # the records and their source kept
    # the same decode, further: resumed
    assert main(["decode", str(run_dir), "--out", str(out), *DECODE]) == 0
    assert len(read_decoded(out)) == 8
    # or, asked for, another one from scratch
    assert main(["decode", str(other), "--out", str(out), *DECODE, "--limit", "2", "--overwrite"]) == 0
    assert len(read_decoded(out)) == 2 and json.loads((tmp_path / "decoded.jsonl.source.json").read_text()) != source


def test_records_that_nothing_says_who_produced_are_not_resumed(run_dir, tmp_path, cli_error):
    out = tmp_path / "old.jsonl"
    append_decoded([Decoded("de0:de", "de", "de", "guten morgen", "guten morgen", 1.0, 0.1)], out)
    cli_error(["decode", run_dir, "--out", out, *DECODE], r"old.jsonl holds decoded records but not what produced "
                                                          r"them \(old.jsonl.source.json is missing\)")
    assert len(read_decoded(out)) == 1


@pytest.mark.parametrize("limit", ["0", "-1", "2.5", "nan"])
def test_decode_limit_must_be_a_positive_count(run_dir, tmp_path, cli_error, limit):
    cli_error(["decode", run_dir, "--out", tmp_path / "d.jsonl", "--limit", limit], "argument --limit")
    assert not (tmp_path / "d.jsonl").exists()


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "tts"], "tasks must be asr, st or both, got 'tts'"),
    (["--device", "tpu"], "--device: .*tpu"),
    (["--device", "meta"], "--device: 'meta'; localgp runs on cpu or cuda"),
    pytest.param(["--device", "cuda"], "sees no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")),
])
def test_decode_refuses_tasks_and_devices_it_has_not(run_dir, tmp_path, cli_error, argv, message):
    cli_error(["decode", run_dir, "--out", tmp_path / "d.jsonl", *DECODE, *argv], message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("segment", ["de0 de0 1.0 0.5", "de0 de0 0.1", "de0 de0 zero 0.5", "de0 de0 0 nan"])
def test_a_kaldi_segment_that_is_no_segment_is_named(tmp_path, cli_error, segment):
    cfg = config(tmp_path, max_steps=1)
    (tmp_path / "data_run" / "de" / "segments").write_text(segment + "\n")
    cli_error(["train", write_config(tmp_path / "c.yaml", cfg)], "segments .de0.: expected '<recording> <start> <end>'")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ numbers

@pytest.mark.parametrize("argv", [
    ["flops", "--seconds", "nan"], ["flops", "--seconds", "inf"], ["flops", "--keep", "nan"],
    ["decode", "r", "--out", "x", "--ctc-weight", "nan"], ["decode", "r", "--out", "x", "--penalty", "inf"],
    ["decode", "r", "--out", "x", "--maxlenratio=-inf"], ["decode", "r", "--out", "x", "--beam", "nan"],
    ["demo", "--minutes", "inf"], ["demo", "--minutes", "0"], ["demo", "--targets", "0.5,nan"],
    ["bench", "--seconds", "nan"], ["bench", "--repeats", "inf"], ["profile", "--warmup", "-1"],
    ["prepare", "demo", "--augment-share", "nan"],
])
def test_numeric_arguments_refuse_non_finite_and_out_of_range_values(cli_error, argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_error(argv, r"argument --[a-z-]+: (expected a finite number|must be|expected a whole number)")
    assert list(tmp_path.iterdir()) == []


def test_report_json_holds_no_nan_but_null_with_a_reason(tmp_path, capsys):
    path = tmp_path / "decoded.jsonl"
    path.write_text(Decoded("u1", "de", "de", "guten tag", "guten tag", 1.0, 0.5).to_json() + "\n"
                    + Decoded("u2", "de", "de", "hallo", "hallo", 1.0, 0.5).to_json().replace('"seconds": 0.5',
                                                                                               '"seconds": NaN') + "\n")
    assert main(["evaluate", str(path), "--out", str(tmp_path / "r")]) == 0
    report = strict_json((tmp_path / "r" / "report.json").read_text())
    assert report["seconds_per_utterance"] is None and "seconds_per_utterance" in report["notes"]
    # the word-start test's statistics are undefined when every keep rate is equal
    tokens = ["▁a", "b", "▁c", "d"] * 3
    append_decoded([Decoded("w", "de", "de", "x", "x", 1.0, 0.1, tokens=tokens, src_attn_keep=[1.0] * 12)],
                   tmp_path / "w.jsonl")
    capsys.readouterr()
    assert main(["analyze", "word-start", str(tmp_path / "w.jsonl"), "--out", str(tmp_path / "ws.json")]) == 0
    result = strict_json((tmp_path / "ws.json").read_text())
    assert result["welch_t"]["p_value"] is None and "welch_t.p_value" in result["notes"]


# ------------------------------------------------------------------ errors

def test_a_user_error_is_one_line_and_exit_2_from_the_shell(tmp_path):
    done = subprocess.run([sys.executable, "-m", "localgp", "evaluate", str(tmp_path / "none.jsonl"), "--out",
                           str(tmp_path / "r")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"localgp evaluate: error: decoded records {tmp_path / 'none.jsonl'} do not "
                                        "exist"]


def test_debug_shows_the_traceback_and_bugs_keep_theirs(tmp_path, monkeypatch):
    from localgp import cli
    from localgp.errors import UserError

    for argv in (["--debug", "evaluate", str(tmp_path / "none.jsonl"), "--out", "r"],
                 ["evaluate", str(tmp_path / "none.jsonl"), "--out", "r", "--debug"]):
        with pytest.raises(FileNotFoundError, match="none.jsonl do not exist"):
            main(argv)
    with pytest.raises(UserError, match="--wheels only applies"):
        main(["prepare", "demo", "--wheels", "w", "--debug"])

    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "cmd_info", bug)
    with pytest.raises(KeyError, match="a bug"):
        main(["info"])
