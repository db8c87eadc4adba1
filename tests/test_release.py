"""Gates files and the release gates (localgp.release): a run's gates exported (float16, the skip
values factorised), read back into the same model within that rounding, refused when damaged or
trained on other weights; the release gates shipped in the package load by name on the real
Whisper base and transcribe real speech."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from localgp import release
from localgp.cli import main
from localgp.data.audio import SAMPLE_RATE
from localgp.errors import DamagedFile, UserError
from localgp.model.convert import GATE_KEY, force_keep
from localgp.runs import load_run
from tests.test_longform import assemble, clips, save_tiny_whisper, tiny_whisper, train_tiny_run  # noqa: F401 (fixtures)

GATES = {"encoder": "temporal", "contexts": [["front", 0]], "skip_fill": "mean", "attention_keys": "all",
         "stand_in_rank": 4, "context_frames": 16, "predictor_width": 8}


@pytest.fixture(scope="module")
def filled_run(tiny_whisper, real_speech, tmp_path_factory):
    """A one-step run of the tiny Whisper with the release recipe's gates (mean fill, stand-ins), its
    gate and stand-in weights then drawn at random: one step leaves every unit kept, and the test
    wants decisions both ways."""
    from localgp.runs import checkpoint_path, read_checkpoint, write_checkpoint

    run = train_tiny_run(tmp_path_factory.mktemp("filled_run"), tiny_whisper, real_speech, GATES)
    state = read_checkpoint(checkpoint_path(run), "")
    gen = torch.Generator().manual_seed(3)
    for key, value in state["model"].items():
        if (".gates." in key or ".stand_ins." in key) and value.is_floating_point():
            value.copy_(torch.randn(value.shape, generator=gen) * 0.5)
    write_checkpoint(state, checkpoint_path(run))
    return run


@pytest.fixture(scope="module")
def exported(filled_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("gates") / "tiny.safetensors"
    return out, release.export_gates(filled_run, out)  # rank 128 > the tiny width 32: float16 alone


def test_factorise_is_exact_at_full_rank_and_its_error_falls_with_the_rank():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(2, 3, 40, 16, generator=gen)
    errors = []
    for rank in (1, 4, 8, 16):
        factors, error = release.factorise(table, rank)
        assert factors[".basis"].shape == (2, 3, 40, rank) and factors[".coeffs"].shape == (2, 3, rank, 16)
        rebuilt = release.rebuild({"t" + k: v for k, v in factors.items()}, "t")
        got = ((rebuilt - table).flatten(-2).norm(dim=-1) / table.flatten(-2).norm(dim=-1)).max()
        assert float(got) == pytest.approx(error, rel=1e-4, abs=1e-6)
        errors.append(error)
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-5 and errors[0] > 0.3
    # a matrix of rank 3 plus a column offset: rank 3 holds it
    low = torch.randn(40, 3, generator=gen) @ torch.randn(3, 16, generator=gen) + torch.randn(16, generator=gen)
    assert release.factorise(low, 3)[1] < 1e-6


def test_exported_gates_load_back_as_the_run_within_float16(exported, filled_run, tiny_whisper, clips):
    path, wrote = exported
    assert wrote["bytes"] == path.stat().st_size and wrote["step"] == 1 and wrote["skip_values_error"] < 1e-6
    tensors, metadata = release.read_gates_file(path)
    assert metadata["weights"]["model"] == "whisper-base" and metadata["extra_state"]
    assert all(t.dtype == torch.float16 for t in tensors.values() if t.is_floating_point())
    run = load_run(filled_run)
    gated, identity = release.load_gates(str(path), str(tiny_whisper))
    assert identity == {"gates file": str(path.resolve()), "gates sha256": wrote["sha256"]}
    want = {k: v for k, v in run.model.state_dict().items() if GATE_KEY in k and torch.is_tensor(v)}
    got = gated.model.state_dict()
    for key, value in want.items():
        if key.endswith(release.SKIP_TABLE):
            error = (got[key] - value).flatten(-2).norm(dim=-1) / value.flatten(-2).norm(dim=-1)
            assert float(error.max()) <= wrote["skip_values_error"] + 2e-3, key
        else:
            torch.testing.assert_close(got[key], value, rtol=2e-3, atol=1e-4, msg=key)
    # the backbone's own weights are the pretrained ones, untouched
    plain = {k: v for k, v in run.model.state_dict().items() if GATE_KEY not in k and torch.is_tensor(v)}
    assert all(torch.equal(got[k], v) for k, v in plain.items())
    # the same decisions and outputs on real speech, but where float16 moved a logit across the threshold
    mel = run.backbone.mel([clips[0], clips[3]])
    masks = []
    for model in (run.model, gated.model):
        with torch.no_grad():
            model.encoder(mel)
        masks.append(torch.stack([m.float() for m in model.encoder.last_record.masks.values()]))
    assert float((masks[0] == masks[1]).float().mean()) >= 0.99
    assert 0.1 < float(masks[0].mean()) < 0.9  # the gates decide: some units kept, some skipped
    # under the same decisions, the stand-ins and skip values compute what the run's do
    outputs = []
    for model in (run.model, gated.model):
        force_keep(model, 0.5, seed=4)
        with torch.no_grad():
            outputs.append(model.encoder(mel))
    assert float((outputs[1] - outputs[0]).norm() / outputs[0].norm()) < 2e-3


def test_a_gates_file_transcribes_from_the_command_line(exported, tiny_whisper, clips, tmp_path):
    path, _ = exported
    sf.write(tmp_path / "talk.wav", assemble([1.0, clips[0], 1.0])[0], SAMPLE_RATE)
    assert main(["transcribe", str(tmp_path / "talk.wav"), "--gates", str(path), "--whisper-dir", str(tiny_whisper),
                 "--language", "en", "--beam", "2", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    record = json.loads((tmp_path / "out" / "talk.json").read_text())
    assert record["model"]["gates file"] == str(path.resolve()) and len(record["model"]["gates sha256"]) == 64
    assert record["segments"] and "encoder.attn" in record["segments"][0]["sparsity"]


def test_a_gates_file_decodes_a_corpus(exported, filled_run, tiny_whisper, tmp_path):
    path, _ = exported
    out = tmp_path / "decoded.jsonl"
    argv = ["decode", "--model", "whisper-base", "--data", filled_run.parent / "manifest.jsonl", "--whisper-dir",
            tiny_whisper, "--gates", path, "--split", "train", "--tasks", "asr", "--beam", "2", "--limit", "2", "--out", out]
    assert main([str(a) for a in argv]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and all("encoder.attn" in r["sparsity"] for r in records)
    source = json.loads(out.with_name(out.name + ".source.json").read_text())
    assert source["model"]["gates file"] == str(path.resolve())


@pytest.mark.parametrize("damage", ["cut_short", "zeroed", "replaced_by", "a_directory"])
def test_a_damaged_gates_file_is_named_with_its_fix(exported, tmp_path, tiny_whisper, clips, cli_error, damage):
    from tests import test_damaged_files as damages

    path, _ = exported
    copy = tmp_path / "gates.safetensors"
    copy.write_bytes(path.read_bytes())
    sf.write(tmp_path / "a.wav", assemble([0.5, clips[0], 0.5])[0], SAMPLE_RATE)
    hurt = damages.replaced_by(tmp_path / "a.wav") if damage == "replaced_by" else getattr(damages, damage)
    hurt(copy)
    cli_error(["transcribe", tmp_path / "a.wav", "--gates", copy, "--whisper-dir", tiny_whisper, "--language", "en",
               "--out", tmp_path / "out"], f"{copy} is damaged .*export")
    assert not (tmp_path / "out" / "a.json").exists()


def test_foreign_gates_files_are_refused(exported, tmp_path, tiny_whisper, cli_error):
    from safetensors.torch import save_file

    path, _ = exported
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(DamagedFile, match="not a localgp gates file"):
        release.load_gates(str(other), str(tiny_whisper))
    # the gates of one model's weights on another's
    (tmp_path / "second").mkdir()
    second = save_tiny_whisper(tmp_path / "second")
    state = torch.load(second / "base.pt", weights_only=False)
    state["model_state_dict"] = {k: v + 0.01 for k, v in state["model_state_dict"].items()}
    torch.save(state, second / "base.pt")
    with pytest.raises(UserError, match="trained on backbone weights"):
        release.load_gates(str(path), str(second))
    cli_error(["transcribe", tmp_path / "a.wav", "--gates", tmp_path / "none.safetensors"], "no such gates file")
    cli_error(["export-gates", tmp_path, "--out", tmp_path / "g.safetensors"], "no checkpoint.pth")
    cli_error(["transcribe", tmp_path / "a.wav", "--model", tmp_path, "--gates", path],
              "a gates file goes on --model whisper-base")


def test_export_gates_command(filled_run, tmp_path, capsys, cli_error):
    out = tmp_path / "g.safetensors"
    assert main(["export-gates", str(filled_run), "--out", str(out), "--rank", "2"]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"wrote {out}: ") and "at rank 2" in line and out.is_file()
    cli_error(["export-gates", str(filled_run), "--out", str(tmp_path / "g.pt")], "ends .safetensors")
    with pytest.raises(SystemExit):
        main(["export-gates", str(filled_run), "--out", str(out), "--rank", "0"])


# ------------------------------------------------------------------ the release gates, real weights
def test_the_release_gates_match_their_recorded_sha256_and_fit_in_10_mb(monkeypatch):
    path, sha256 = release.resolve("default")
    assert sha256 == release.RELEASES["default"].sha256
    assert path.stat().st_size <= 10_000_000
    _, metadata = release.read_gates_file(path)
    assert metadata["config"]["backbone"] == "whisper-base" and metadata["skip_values"]["relative_error"] < 0.05
    wrong = release.Release(release.RELEASES["default"].file, "0" * 64, "")
    monkeypatch.setitem(release.RELEASES, "default", wrong)
    with pytest.raises(DamagedFile, match="not the recorded 0000"):
        release.resolve("default")


def test_the_release_gates_transcribe_real_speech_skipping_speech(whisper_base, real_speech, tmp_path):
    """The packaged gates on the real Whisper base: English read prompts joined with pauses,
    transcribed with their speaker context, against the plain model on the same file."""
    from localgp.bench.transcribe import wer
    from localgp.longform import transcribe
    from tests.test_whisper_train import TEXTS

    english = [item for item in real_speech if item["language"] == "en"]
    audio, _ = assemble([0.5] + [part for item in english for part in (item["wav"], 1.0)])
    sf.write(tmp_path / "prompts.wav", audio, SAMPLE_RATE)
    reference = " ".join(TEXTS[item["id"].split("_", 1)[1]]["en"] for item in english)
    results = {gates: transcribe(tmp_path / "prompts.wav", gates=gates, whisper_dir=str(whisper_base), language="en",
                                 device="cpu", progress=False)
               for gates in (None, "default")}
    dense, gated = (results[g].transcripts[0] for g in (None, "default"))
    assert wer(reference, gated.text, "en") <= wer(reference, dense.text, "en") + 10.0, (gated.text, dense.text)
    speech = [s.frames_skipped["speech"] for s in gated.segments if s.frames_skipped.get("speech") is not None]
    assert speech and 0.05 < float(np.mean(speech)) < 0.9  # the gates skip speech, not only padding
    assert gated.segments[0].sparsity and not dense.segments[0].sparsity


def test_the_release_gates_run_in_the_decode_bench(whisper_base, real_speech, tmp_path):
    """`localgp bench --backbone whisper-base --checkpoint default`: the release gates decide the
    masks of the clips, fed their speaker context."""
    from localgp import bench

    for item in real_speech[:2]:
        sf.write(tmp_path / f"{item['id']}.wav", item["wav"], SAMPLE_RATE)
    setting = bench.Setting(backbone="whisper-base", batch=2, audio=str(tmp_path), weights=str(whisper_base),
                            checkpoint="default")
    rows = bench.run_bench("encoder", setting, ["dense", "compact"], keeps=[], repeats=1, warmup=0)
    by = {r["provider"]: r for r in rows}
    assert by["compact"]["masks"] == "gates" and by["compact"]["gflops"] < 0.5 * by["dense"]["gflops"]
