"""torchrun (torch.distributed) for training and corpus decoding, with real processes: torchrun
starts them (Gloo on the CPU, rendezvous on the loopback), one thread each. The one-process
references run here, on one thread too."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from localgp import distributed
from localgp.decoding import DecodeOptions
from localgp.errors import UserError
from localgp.evaluate import read_decoded
from localgp.train import Trainer, batch_order, split_batch
from localgp.decode import decode_run, part_path, part_paths
from tests.test_train import config

TRAIN = dict(max_steps=5, micro_batches=2, log_every=1, save_every=5)
DECODE = ["--beam", "2", "--maxlenratio", "-3", "--batch", "1"]
TIMING = ("seconds", "encoder_seconds")  # the only fields of a record that may differ between decodes


def torchrun(nproc: int, *args, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N ARGS` (a free loopback port), one thread a process."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           *map(str, args)], env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_config(path: Path, cfg) -> Path:
    path.write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg)))))
    return path


def parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pth", weights_only=False)["model"]


def assert_same_parameters(a: Path, b: Path) -> None:
    """Every tensor of the two runs' checkpoints equal within 1e-6 relative (fp32)."""
    pa, pb = parameters(a), parameters(b)
    assert pa.keys() == pb.keys()
    for name, value in pa.items():
        scale = value.abs().max().clamp_min(1e-12)
        assert (value - pb[name]).abs().max() <= 1e-6 * scale, name


def log_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


# ------------------------------------------------------------------ training

def test_each_step_batch_is_shared_out_once_whatever_the_number_of_processes():
    for step in range(4):
        picked = batch_order(10, 8, step, seed=3)
        micro = split_batch(picked, 4)
        assert [len(m) for m in micro] == [2, 2, 2, 2] and sum(micro, []) == picked
        for world in (1, 2, 4):
            shares = [[i for part in distributed.shard(4, rank, world) for i in micro[part]] for rank in range(world)]
            assert sorted(sum(shares, [])) == sorted(picked) and len({len(s) for s in shares}) == 1
    shares = distributed.balance([5.0, 1.0, 4.0, 2.0, 3.0, 3.0], 2)
    assert sorted(sum(shares, [])) == list(range(6)) and [sum([5, 1, 4, 2, 3, 3][i] for i in s) for s in shares] == [9, 9]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """5 steps in one process (2 micro-batches of 2 accumulated per step): the reference."""
    tmp = tmp_path_factory.mktemp("straight")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(config(tmp, **TRAIN)).train()
    finally:
        torch.set_num_threads(threads)
    return tmp / "run"


def test_two_processes_train_as_one_on_the_same_global_batches(straight, tmp_path):
    cfg = config(tmp_path, **TRAIN)
    torchrun(2, "-m", "localgp", "train", write_config(tmp_path / "train.yaml", cfg))
    assert_same_parameters(straight, tmp_path / "run")
    rows = log_rows(tmp_path / "run")  # rank 0 alone logs: one row per step, the means over both ranks
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for mine, reference in zip(rows, log_rows(straight), strict=True):
        assert mine.keys() == reference.keys()
        for key in ("loss", "total", "sparsity", "grad_norm"):
            assert mine[key] == pytest.approx(reference[key], rel=1e-6), key


def test_a_checkpoint_of_two_processes_resumes_in_one_and_in_two(straight, tmp_path, one_thread):
    cfg = config(tmp_path, **TRAIN)
    torchrun(2, "-m", "localgp", "train", write_config(tmp_path / "train.yaml", cfg), "--steps", "3")
    assert torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=False)["step"] == 3
    for copy in ("in_one", "in_two"):
        shutil.copytree(tmp_path / "run", tmp_path / copy)
    Trainer(dataclasses.replace(cfg, out_dir=str(tmp_path / "in_one"))).train()
    torchrun(2, "-m", "localgp", "train",
             write_config(tmp_path / "two.yaml", dataclasses.replace(cfg, out_dir=str(tmp_path / "in_two"))))
    for resumed in ("in_one", "in_two"):
        assert_same_parameters(straight, tmp_path / resumed)
        assert [r["step"] for r in log_rows(tmp_path / resumed)] == [1, 2, 3, 4, 5]


def test_micro_batches_must_be_shared_by_the_processes(tmp_path, monkeypatch, cli_error):
    """Refused before anything is written or exchanged (as rank 0 of 2 processes sees it)."""
    monkeypatch.setattr(distributed, "setup", lambda device, *args, **kwargs: distributed.Context(0, 2, device))
    cfg = config(tmp_path, **{**TRAIN, "micro_batches": 1})
    cli_error(["train", write_config(tmp_path / "train.yaml", cfg)],
              r"TrainConfig.micro_batches \(1\) cannot be shared by the 2 processes torchrun started")
    with pytest.raises(UserError, match="micro_batches must divide batch_size"):
        config(tmp_path, **{**TRAIN, "micro_batches": 3})
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ decoding

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("decode_run")
    Trainer(config(tmp, max_steps=30, save_every=30)).train()
    return tmp / "run"


@pytest.fixture(scope="module")
def one_process(run_dir, tmp_path_factory):
    """The records of a plain one-process decode of the run's 8 examples, in the order written."""
    out = tmp_path_factory.mktemp("one_process") / "decoded.jsonl"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        decode_run(run_dir, out, options=DecodeOptions(beam_size=2, maxlenratio=-3), batch_size=1)
    finally:
        torch.set_num_threads(threads)
    return [line for line in out.read_text().splitlines()]


def without_timing(line: str) -> dict:
    return {k: v for k, v in json.loads(line).items() if k not in TIMING}


def test_two_processes_decode_what_one_does_record_for_record(run_dir, one_process, tmp_path):
    out = tmp_path / "decoded.jsonl"
    torchrun(2, "-m", "localgp", "decode", run_dir, "--out", out, *DECODE)
    lines = out.read_text().splitlines()
    assert [without_timing(line) for line in lines] == [without_timing(line) for line in one_process]
    assert len(lines) == 8 and not part_paths(out)  # merged, then removed


def test_a_rank_killed_mid_way_and_the_rerun_leave_every_record_once(run_dir, one_process, tmp_path):
    out = tmp_path / "decoded.jsonl"
    crashed = torchrun(2, Path(__file__).parent / "torchrun_crash.py", "decode", run_dir, "--out", out, *DECODE,
                       env={"CRASH_RANK": "1"}, check=False)
    assert crashed.returncode != 0 and not out.exists()
    before = [line for part in part_paths(out) for line in part.read_text().splitlines()]
    assert 1 <= len(before) < 8 and len(part_path(out, 1).read_text().splitlines()) == 1  # rank 1 died after one
    with open(part_path(out, 0), "a") as f:  # and a record cut short, as a kill while writing leaves it
        f.write('{"id": "fr3:fr", "language": "f')
    torchrun(2, "-m", "localgp", "decode", run_dir, "--out", out, *DECODE)
    lines = out.read_text().splitlines()
    assert [without_timing(line) for line in lines] == [without_timing(line) for line in one_process]
    assert set(before) <= set(lines)  # the records written before the crash are kept, not decoded again
    assert len(read_decoded(out)) == 8 and not part_paths(out)
