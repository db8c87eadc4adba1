"""`localgp bench` and `localgp profile` on the tiny model: the JSON/CSV contract, the derived
numbers, the per-module labels, and the errors."""

import csv
import json

import pytest
import torch

from localgp import bench, flops, profile
from localgp.backbones.owsm.bench import PROVIDERS as OWSM_PROVIDERS
from localgp.cli import main
from tests.conftest import requires_cuda

CONTRACT = ("part", "provider", "keep", "preset", "batch", "seconds", "dtype", "device", "median_ms", "p20_ms",
            "p80_ms", "gflops", "speedup_vs_dense", "speedup_vs_masked", "efficiency")
TINY = ["--preset", "tiny", "--seconds", "2"]


@pytest.fixture(autouse=True)
def one_thread():
    """The smoke runs are tiny: one thread keeps them quick when other jobs share the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("part", ["layer", "encoder"])
def test_bench_rows_carry_the_contract(part, tmp_path, capsys):
    out_json, out_csv = tmp_path / "rows.json", tmp_path / "rows.csv"
    main(["bench", "--part", part, *TINY, "--keep", "1.0,0.5", "--providers", "espnet,compact", "--repeats", "2",
          "--warmup", "0", "--json", str(out_json), "--csv", str(out_csv)])
    assert "efficiency" in capsys.readouterr().out
    rows = json.loads(out_json.read_text())
    # dense and masked come along as the baselines of the speedups
    assert [(r["provider"], r["keep"]) for r in rows] == [
        (p, k) for k in (1.0, 0.5) for p in ("espnet", "dense", "masked", "compact")]
    for r in rows:
        assert all(r[k] is not None for k in CONTRACT), r
        assert r["part"] == part and r["preset"] == "tiny" and r["dtype"] == "float32" and r["device"] == "cpu"
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["revision"] and r["torch"] == torch.__version__ and r["frames"] == 49
        by = {x["provider"]: x for x in rows if x["keep"] == r["keep"]}
        assert r["speedup_vs_dense"] == pytest.approx(by["dense"]["median_ms"] / r["median_ms"])
        assert r["speedup_vs_masked"] == pytest.approx(by["masked"]["median_ms"] / r["median_ms"])
        assert r["efficiency"] == pytest.approx(r["speedup_vs_dense"] * r["gflops"] / by["dense"]["gflops"])
    half = {r["provider"]: r for r in rows if r["keep"] == 0.5}
    # masked computes everything; compact only the kept frames of FFN1/attention/FFN2
    assert half["masked"]["gflops"] == half["dense"]["gflops"] == half["espnet"]["gflops"]
    assert half["compact"]["gflops"] < half["dense"]["gflops"]
    full = {r["provider"]: r for r in rows if r["keep"] == 1.0}
    assert full["compact"]["gflops"] == full["dense"]["gflops"] and full["compact"]["kept_share"] == 1.0
    assert half["compact"]["kept_share"] == pytest.approx(0.5, abs=0.1)
    with open(out_csv) as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and float(table[3]["median_ms"]) == pytest.approx(rows[3]["median_ms"])


@pytest.mark.parametrize("part", ["layer", "encoder"])
def test_espnet_and_dense_compute_the_same(part):
    """dense is ESPnet's computation through our code: the baseline must not differ in what it computes."""
    workload = bench.workload(part, bench.Setting(preset="tiny", seconds=2))
    with torch.inference_mode():
        espnet = workload.case("espnet", 1.0).run()[0]
        dense = workload.case("dense", 1.0).run()
        masked = workload.case("masked", 1.0).run()
    dense, masked = (dense[0], masked[0]) if part == "encoder" else (dense, masked)
    assert torch.equal(espnet, dense) and torch.equal(espnet, masked)


def test_profile_labels_add_up(tmp_path, capsys):
    out = tmp_path / "prof"
    main(["profile", *TINY, "--keep", "0.5", "--repeats", "1", "--out", str(out)])
    assert "gate+c+s" in capsys.readouterr().out
    report = json.loads((out / "profile.json").read_text())
    by = {r["mode"]: r for r in report["results"]}
    assert set(by) == {"dense", "masked", "compact"}
    layer_modules = {"subsampling", "ffn1", "attention", "cgmlp", "merge", "ffn2"}
    assert layer_modules | {"gate", "compaction", "scatter"} <= set(by["compact"]["modules_ms"])
    assert layer_modules | {"gate", "scatter"} <= set(by["masked"]["modules_ms"])
    assert not {"gate", "compaction", "scatter"} & set(by["dense"]["modules_ms"])
    for r in report["results"]:
        assert sum(r["modules_ms"].values()) == pytest.approx(r["total_ms"])
        assert r["syncs"] is None  # counted on CUDA only
        # One host read per gated layer in compact execution (the layer's gate_plan), none else.
        assert r["host_reads_per_layer"] == (1 if r["mode"] == "compact" else 0)
        assert r["host_reads"] == r["host_reads_per_layer"] * report["layers"]
        trace = json.loads((out / r["trace"]).read_text())
        assert any(e.get("name") == "localgp.ffn1" for e in trace["traceEvents"])
    for mode in ("dense", "masked", "compact"):
        assert (out / f"profile_{mode}.png").read_bytes()[:4] == b"\x89PNG"
    assert "compaction" in (out / "profile.txt").read_text()


@pytest.mark.parametrize("part", ["layer", "encoder"])
def test_bench_with_trained_gates(part, trained_run, tmp_path, cli_error):
    out = tmp_path / "rows.json"
    main(["bench", "--part", part, "--checkpoint", str(trained_run), "--seconds", "2", "--repeats", "1",
          "--warmup", "0", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert {r["masks"] for r in rows} == {"gates"} and {r["preset"] for r in rows} == {"tiny"}
    by = {r["provider"]: r for r in rows}
    # the gates decide: the same masks in masked and compact, and their share is the row's keep
    assert by["compact"]["kept_share"] == by["masked"]["kept_share"]
    assert all(r["keep"] == by["masked"]["kept_share"] for r in rows)
    cli_error(["bench", "--part", part, "--checkpoint", trained_run, "--preset", "tiny"], "--preset and --checkpoint")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A `localgp train` run directory: tiny model, temporal gates on the speech, one step."""
    from localgp.train import Trainer
    from tests.test_train import config

    root = tmp_path_factory.mktemp("bench")
    Trainer(config(root, "run", max_steps=1, gates={"encoder": "temporal"})).train()
    return root / "run"


def test_attribution_gives_each_moment_to_the_innermost_label():
    spans = [(0, 10, "ffn1"), (2, 4, "compaction"), (12, 20, "attention"), (14, 16, "scatter")]
    times = profile.attribute(spans, 0, 25)
    assert times == {"ffn1": 8, "compaction": 2, "other": 7, "attention": 6, "scatter": 2}


@pytest.mark.parametrize("argv, message", [
    (["bench", "--providers", "dense,fast"], "--providers"),
    (["bench", "--keep", "1.0,1.5"], "--keep"),
    (["bench", "--keep", "half"], "--keep"),
    (["bench", "--seconds", "0.01"], "--seconds"),
    (["bench", "--dtype", "float16"], "--dtype"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--device", "tpu"], "--device"),
    (["bench", "--checkpoint", "somewhere", "--keep", "0.5"], "--keep and --checkpoint"),
    (["profile", "--keep", "-0.1"], "--keep"),
    (["profile", "--checkpoint", "/nonexistent/run"], "--checkpoint"),
])
def test_bad_settings_name_their_flag(argv, message, cli_error):
    cli_error([*argv, "--preset", "tiny"] if "--checkpoint" not in argv else argv, message)


def test_unknown_part_is_refused(cli_error):
    cli_error(["bench", "--part", "everything"], "--part")
    with pytest.raises(bench.BenchError, match="--part"):
        bench.run_bench("everything", bench.Setting(preset="tiny"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_is_refused(cli_error):
    cli_error(["bench", *TINY, "--device", "cuda"], "--device cuda")


@requires_cuda
def test_bench_and_profile_on_cuda(tmp_path):
    rows = bench.run_bench("encoder", bench.Setting(preset="tiny", seconds=2, device="cuda", dtype="bfloat16"),
                           keeps=[0.5], repeats=2, warmup=1)
    assert {r["provider"] for r in rows} == set(OWSM_PROVIDERS) and rows[0]["cuda"] == torch.version.cuda
    report = profile.run_profile("encoder", bench.Setting(preset="tiny", seconds=2, device="cuda"), keeps=[0.5],
                                 repeats=1, out=tmp_path)
    compact = next(r for r in report["results"] if r["mode"] == "compact")
    assert compact["syncs"] >= 1 and {"compaction", "ffn1", "scatter"} <= set(compact["modules_ms"])


DECODER = [*TINY, "--tokens", "4", "--batch", "2", "--beam", "2"]


@pytest.mark.parametrize("part", ["decoder-step", "decode"])
def test_decoder_bench_rows(part, tmp_path):
    out = tmp_path / "rows.json"
    main(["bench", "--part", part, *DECODER, "--keep", "1.0,0.5", "--providers", "espnet,compact", "--repeats", "1",
          "--warmup", "0", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["provider"], r["keep"]) for r in rows] == [
        (p, k) for k in (1.0, 0.5) for p in ("espnet", "dense", "masked", "compact")]
    for r in rows:
        assert all(r[k] is not None for k in CONTRACT if k != "kept_share"), r
        assert r["part"] == part and r["beam"] == 2 and r["tokens"] == 4
    half = {r["provider"]: r for r in rows if r["keep"] == 0.5}
    full = {r["provider"]: r for r in rows if r["keep"] == 1.0}
    # ESPnet re-projects prefix and memory for every hypothesis at every step
    assert half["espnet"]["gflops"] > half["dense"]["gflops"] == half["masked"]["gflops"] > half["compact"]["gflops"]
    assert full["compact"]["gflops"] == full["dense"]["gflops"] and full["compact"]["kept_share"] == 1.0
    assert 0.2 < half["compact"]["kept_share"] < 0.8 and half["masked"]["kept_share"] == half["compact"]["kept_share"]


def test_decode_providers_find_the_same_hypotheses():
    """dense is ESPnet's search through localgp's decoder; masked and compact at keep 1.0 too."""
    workload = bench.workload("decode", bench.Setting(preset="tiny", seconds=2, batch=2, beam=2, tokens=5))
    with torch.inference_mode():
        espnet = [[h.yseq.tolist() for h in nbest] for nbest in workload.case("espnet", 1.0).run()]
        for provider in ("dense", "masked", "compact"):
            got = [[h.yseq for h in nbest] for nbest in workload.case(provider, 1.0).run()]
            assert [g[0] for g in got] == [e[0] for e in espnet], provider


def test_profile_decode_labels(tmp_path):
    out = tmp_path / "prof"
    main(["profile", "--part", "decode", *DECODER, "--keep", "0.5", "--repeats", "1", "--out", str(out)])
    by = {r["mode"]: r for r in json.loads((out / "profile.json").read_text())["results"]}
    decoder = {"self_attn", "src_attn", "ffn", "output", "beam", "memory_kv"}
    assert decoder | {"gate", "compaction", "scatter"} <= set(by["compact"]["modules_ms"])
    assert decoder <= set(by["dense"]["modules_ms"]) and "compaction" not in by["dense"]["modules_ms"]


def test_decoder_module_costs_script(tmp_path, capsys):
    """benchmarks/decode_modules.py: every module timed on all and on kept rows, and the best
    compact step derived from them."""
    import runpy
    import sys

    out = tmp_path / "modules.json"
    argv = sys.argv
    sys.argv = ["decode_modules.py", "--preset", "tiny", "--seconds", "2", "--batch", "3", "--beam", "2",
                "--tokens", "6", "--keep", "0.5", "--repeats", "2", "--json", str(out)]
    try:
        runpy.run_path("benchmarks/decode_modules.py", run_name="__main__")
    finally:
        sys.argv = argv
    result = json.loads(out.read_text())
    assert [r["module"] for r in result["modules"]] == ["self_attn", "src_attn", "ffn"]
    for row in result["modules"]:
        assert row["rows"] == 6 and 0 < row["kept_share"] < 1 and row["all_ms"] > 0 and row["kept_ms"] > 0
    saving = sum(r["all_ms"] - r["kept_ms"] for r in result["modules"])
    assert result["best_step_ms"] == pytest.approx(result["dense_step_ms"] - saving)
    assert result["best_speedup"] == pytest.approx(result["dense_step_ms"] / result["best_step_ms"])
    assert "best compact" in capsys.readouterr().out


def test_decoder_module_costs_need_a_share_to_skip():
    from localgp.backbones.owsm.bench_decoder import module_costs

    with pytest.raises(bench.BenchError, match="--keep"):
        module_costs(bench.Setting(preset="tiny", seconds=2, batch=1, beam=2, tokens=5), 1.0, repeats=1)


# ------------------------------------------------------------------ Whisper base, real weights and clips
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, real_speech):
    import soundfile

    folder = tmp_path_factory.mktemp("clips")
    for utt in real_speech[:2]:
        soundfile.write(folder / f"{utt['id']}.wav", utt["wav"], 16000)
    return folder


def test_whisper_bench_rows_beside_openai_whisper_and_faster_whisper(whisper_base, clip_dir):
    setting = bench.Setting(backbone="whisper-base", batch=2, audio=str(clip_dir), weights=str(whisper_base))
    rows = bench.run_bench("encoder", setting, keeps=[0.5], repeats=1, warmup=0)
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"openai-whisper", "faster-whisper-float32", "faster-whisper-int8", "dense", "masked", "compact"}
    dense = 2 * flops.whisper_encoder_macs(flops.WHISPER_BACKBONES["whisper-base"])["total"] / 1e9
    assert by["dense"]["gflops"] == pytest.approx(dense) == by["openai-whisper"]["gflops"]
    assert by["compact"]["gflops"] < 0.7 * dense and 0.4 < by["compact"]["kept_share"] < 0.6
    assert all(r["backbone"] == "whisper-base" and r["audio_seconds"] > 1 for r in rows)
    assert "faster-whisper-int8" in bench.table(rows)
    decode = bench.run_bench("decode", setting, ["openai-whisper", "compact"], keeps=[1.0], repeats=1, warmup=0)
    by = {r["provider"]: r for r in decode}
    assert by["openai-whisper"]["gflops"] is None and by["compact"]["gflops"] > dense


def test_whisper_bench_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(bench.BenchError, match="--part: whisper-base has no part 'layer'"):
        bench.run_bench("layer", bench.Setting(backbone="whisper-base"), keeps=[0.5])
    with pytest.raises(bench.BenchError, match="--audio: .* does not exist"):
        bench.workload("encoder", bench.Setting(backbone="whisper-base", audio=str(tmp_path / "none")))
    with pytest.raises(bench.BenchError, match="--providers: part layer has no provider"):
        bench.run_bench("layer", bench.Setting(preset="tiny", seconds=2), ["openai-whisper"], keeps=[0.5])
