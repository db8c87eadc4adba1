"""The gated OWSM model: conversion, masked == compact, gates, sparsity training, checkpoints."""

import copy

import numpy as np
import pytest
import torch

from localgp import flops, ops
from localgp.errors import UserError
from localgp.gates import GateRecord, gate_mask, sparsity_loss
from localgp.backbones.owsm import weights as owsm
from localgp.model.config import GateConfig
from localgp.backbones.owsm.model import gate_s2t_model
from localgp.model.convert import (
    force_keep,
    gate_state_dict,
    last_record,
    pruning_loss,
    set_execution,
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, args = owsm.build_owsm("tiny")
    return model.eval(), args


def speech(batch_lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(batch_lengths), max(batch_lengths), flops.N_MELS, generator=gen)
    return feats, torch.tensor(batch_lengths)


def waveform(seconds, seed=0):
    """Random 16 kHz audio for the full model, whose frontend computes the fbank."""
    gen = torch.Generator().manual_seed(seed)
    samples = [int(s * 16000) for s in seconds]
    return torch.randn(len(samples), max(samples), generator=gen) * 0.1, torch.tensor(samples)


def tokens(batch_lengths, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab - 4, (len(batch_lengths), max(batch_lengths)), generator=gen), torch.tensor(batch_lengths)


def randomise_gates(model, seed=0):
    """'Trained' gates: random predictor weights, so decisions vary per frame and layer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pruning." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


CONFIGS = {
    "local_temporal_token": GateConfig(encoder="temporal", decoder="token"),
    "local_utterance": GateConfig(encoder="utterance", decoder="utterance"),
    "global_utterance": GateConfig(predictor="global", encoder="utterance", decoder="utterance"),
    "local_speaker_lang2vec": GateConfig(encoder="temporal", decoder="token", contexts=(("front", 0), ("speaker", 192)),
                                         decoder_contexts=(("lang2vec", 289),)),
}


def gated_copy(tiny, name):
    model = gate_s2t_model(copy.deepcopy(tiny[0]), CONFIGS[name]).eval()
    B = 3
    if name == "global_utterance":
        model.encoder.set_context(prompt=torch.randint(0, 500, (B, 2)))
    if name == "local_speaker_lang2vec":
        model.encoder.set_context(speaker=torch.randn(B, 192))
        model.decoder.set_context(lang2vec=torch.randn(B, 289))
    return model


def run(model, feats, flens, ys, ylens):
    with torch.no_grad():
        enc, elens, _ = model.encoder(feats, flens)
        dec, _ = model.decoder(enc, elens, ys, ylens)
    return enc, elens, dec


def valid_rows(out, lengths):
    return out[torch.arange(out.shape[1]) < lengths[:, None]]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_all_keep_is_bit_identical_to_espnet(tiny, name):
    model = gated_copy(tiny, name)
    force_keep(model, 1.0)
    feats, flens = speech([300, 300, 300])
    ys, ylens = tokens([9, 9, 9], 600)
    want = run(tiny[0], feats, flens, ys, ylens)
    got = run(model, feats, flens, ys, ylens)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("masks", ["forced_0.5", "forced_0.2", "trained"])
def test_masked_equals_compact(tiny, name, masks):
    model = gated_copy(tiny, name)
    if masks == "trained":
        randomise_gates(model)
    feats, flens = speech([300, 211, 97])
    ys, ylens = tokens([11, 7, 1], 600)
    outs = {}
    for execution in ("masked", "compact"):
        set_execution(model, execution)
        force_keep(model, float(masks.split("_")[1]) if "forced" in masks else None, seed=5)
        outs[execution] = run(model, feats, flens, ys, ylens)
        outs[execution + "_sparsity"] = last_record(model).sparsity_per_module()
    assert outs["masked_sparsity"] == outs["compact_sparsity"]
    skipped = [v for v in outs["masked_sparsity"].values()]
    assert max(skipped) > 0, "the masks must actually skip something"
    for i in (0, 2):
        lengths = outs["masked"][1] if i == 0 else ylens
        m, c = valid_rows(outs["masked"][i], lengths), valid_rows(outs["compact"][i], lengths)
        assert float((m - c).abs().max()) <= 1e-5 * float(m.abs().max())


@pytest.mark.parametrize("name", ["local_temporal_token", "local_utterance"])
def test_compact_encoder_reads_the_host_once_per_layer_and_adds_in_place(tiny, name):
    model = gated_copy(tiny, name)
    feats, flens = speech([400, 250])
    set_execution(model, "compact")
    outs = []
    for grad in (False, True):  # in place under no_grad; a new tensor per add with autograd
        force_keep(model, 0.5, seed=1)
        with torch.set_grad_enabled(grad):
            before = ops.host_reads()
            outs.append(model.encoder(feats, flens)[0].detach())
            if not grad:
                assert ops.host_reads() - before == len(model.encoder.encoders)
    assert torch.equal(outs[0], outs[1])


def test_compact_skips_work_and_counts_it(tiny):
    model = gated_copy(tiny, "local_temporal_token")
    feats, flens = speech([400, 400])
    force_keep(model, 0.5, seed=1)
    set_execution(model, "masked")
    model.encoder(feats, flens)
    masked = flops.executed_encoder_macs(model.encoder, flens)
    set_execution(model, "compact")
    force_keep(model, 0.5, seed=1)
    model.encoder(feats, flens)
    compact = flops.executed_encoder_macs(model.encoder, flens)
    shape = flops.EncoderShape.of_encoder(model.encoder)
    assert masked == {k: 2 * v for k, v in flops.encoder_macs(shape, 400).items()}
    assert compact["cgmlp"] == masked["cgmlp"] and compact["subsampling"] == masked["subsampling"]
    for module in ("ffn1", "attn", "ffn2"):
        assert 0.3 < compact[module] / masked[module] < 0.7


def test_gradients_reach_the_gates_through_the_estimator(tiny):
    model = gated_copy(tiny, "local_temporal_token")
    model.train()
    feats, flens = waveform([2.0, 1.5])
    ys, ylens = tokens([8, 6], 600)
    loss, _, _ = model(feats, flens, ys, ylens, ys[:, :1], torch.ones(2, dtype=torch.long),
                       ys, ylens)
    total, sparsity = pruning_loss(model, loss, target=0.3)
    total.backward()
    gate_grads = [p.grad for n, p in model.named_parameters() if "pruning." in n and "to_logits" in n]
    assert gate_grads and all(g is not None and g.abs().sum() > 0 for g in gate_grads)


def test_gate_mask_is_binary_and_straight_through():
    logits = torch.randn(4000, 2, requires_grad=True)
    mask = gate_mask(logits, training=True)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    mask.sum().backward()
    assert logits.grad.abs().sum() > 0
    # Sampled keep rate follows the keep probability.
    p_keep = torch.softmax(logits.detach(), -1)[:, 1].mean()
    assert abs(float(mask.mean()) - float(p_keep)) < 0.05
    assert torch.equal(gate_mask(logits, training=False, threshold=0.5), (logits[:, 1] > logits[:, 0]).float())


def test_sparsity_loss_and_record():
    assert float(sparsity_loss(torch.tensor(0.3), 0.3)) == 0.0
    assert float(sparsity_loss(torch.tensor(0.5), 0.3)) == pytest.approx(0.2 + 0.04)
    record = GateRecord()
    record.add("encoder.0.ffn1", torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[True, True, False]]))
    record.add("encoder.1.ffn1", torch.tensor([[1.0, 1.0, 1.0]]))
    assert float(record.sparsity()) == pytest.approx(1 / 5)
    assert record.sparsity_per_module() == {"encoder.ffn1": pytest.approx(1 / 5)}
    with pytest.raises(ValueError, match="no decoder gate was applied"):
        record.sparsity("decoder")
    record.add("decoder.0.ffn", torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    assert float(record.sparsity("encoder")) == pytest.approx(1 / 5)
    assert float(record.sparsity("decoder")) == pytest.approx(1 / 2)
    assert float(record.sparsity()) == pytest.approx(3 / 9)


@pytest.mark.parametrize("decoder_target", [None, 0.5])
def test_training_reaches_the_target_sparsity(tiny, decoder_target):
    """A short CPU loop on random data drives achieved sparsity to 0.3 +- 0.03; with a decoder target
    of its own, the encoder's to 0.3 and the decoder's to 0.5, each +- 0.05."""
    torch.manual_seed(0)
    model = gate_s2t_model(copy.deepcopy(tiny[0]), GateConfig(encoder="temporal", decoder="token")).train()
    gates = [p for n, p in model.named_parameters() if "pruning." in n]
    optimizer = torch.optim.Adam(gates, lr=3e-2)
    feats, flens = waveform([1.6, 1.6, 1.2, 1.0], seed=1)
    ys, ylens = tokens([10, 8, 8, 6], 600, seed=1)
    prev, prev_lens = ys[:, :1], torch.ones(4, dtype=torch.long)
    for _ in range(80):
        loss, _, _ = model(feats, flens, ys, ylens, prev, prev_lens, ys, ylens)
        total, _ = pruning_loss(model, loss, target=0.3, alpha=5.0, decoder_target=decoder_target)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        model(feats, flens, ys, ylens, prev, prev_lens, ys, ylens)
    record = last_record(model)
    if decoder_target is None:
        achieved = float(record.sparsity())
        assert abs(achieved - 0.3) <= 0.03, achieved
    else:
        encoder, decoder = float(record.sparsity("encoder")), float(record.sparsity("decoder"))
        assert abs(encoder - 0.3) <= 0.05 and abs(decoder - decoder_target) <= 0.05, (encoder, decoder)


def test_checkpoint_round_trip_in_owsm_layout(tiny, tmp_path):
    owsm.write_feats_stats(tmp_path / "stats.npz", np.zeros(80), np.ones(80))
    model, args = owsm.build_owsm("tiny", stats_file=str(tmp_path / "stats.npz"))
    owsm.write_checkpoint(model, args, tmp_path / "snapshot")
    assert (tmp_path / "snapshot" / owsm.STATS_PATH).exists()
    loaded, _ = owsm.load_owsm(tmp_path / "snapshot")
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())

    # Real (ungated) OWSM weights load into a gated model: only gate keys are missing.
    gated = gate_s2t_model(copy.deepcopy(loaded), CONFIGS["local_temporal_token"])
    result = gated.load_state_dict(want, strict=False)
    assert result.unexpected_keys == [] and all("pruning." in k for k in result.missing_keys)
    # Fine-tuned gates travel with the model: a fresh gated model loads them back exactly.
    randomise_gates(gated, seed=3)
    torch.save(gated.state_dict(), tmp_path / "gated.pth")
    fresh = gate_s2t_model(owsm.load_owsm(tmp_path / "snapshot")[0], CONFIGS["local_temporal_token"])
    fresh.load_state_dict(torch.load(tmp_path / "gated.pth"))
    assert all(torch.equal(v, gate_state_dict(gated)[k]) for k, v in gate_state_dict(fresh).items())


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        owsm.load_owsm(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no exp/\\*/config.yaml"):
        owsm.load_owsm(tmp_path)
    model, args = owsm.build_owsm("tiny")
    path = owsm.write_checkpoint(model, args, tmp_path / "snap")
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not load the model weights"):
        owsm.load_owsm(tmp_path / "snap")


def test_presets_match_owsm():
    assert owsm.PRESETS["medium"].d_model == 1024 and owsm.PRESETS["medium"].encoder_layers == 18
    args = owsm.owsm_args("small", owsm.owsm_token_list(50000))
    assert args.encoder_conf["output_size"] == 768 and args.encoder_conf["num_blocks"] == 9
    assert args.decoder_conf["num_blocks"] == 9 and args.encoder_conf["cgmlp_linear_units"] == 3072
    model, _ = owsm.build_owsm("base")
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 101) < 1


def test_unsupported_encoders_are_refused_at_conversion():
    from espnet2.asr.encoder.e_branchformer_encoder import EBranchformerEncoder

    from localgp.backbones.owsm.encoder import gate_encoder

    def encoder(**conf):
        return EBranchformerEncoder(80, output_size=32, attention_heads=2, num_blocks=2, linear_units=64,
                                    cgmlp_linear_units=64, use_ffn=True, macaron_ffn=True, **conf)

    with pytest.raises(ValueError, match="must be plain self-attention .* got RelPositionMultiHeadedAttention"):
        gate_encoder(encoder(), GateConfig())  # ESPnet's default: relative positions
    with pytest.raises(ValueError, match="intermediate CTC layers"):
        gate_encoder(encoder(attention_layer_type="selfattn", pos_enc_layer_type="abs_pos", interctc_layer_idx=[1]),
                     GateConfig())


def test_gating_errors(tiny):
    with pytest.raises(ValueError, match="globalGP is utterance-wise"):
        GateConfig(predictor="global", encoder="temporal")
    with pytest.raises(ValueError, match="threshold must lie in"):
        GateConfig(threshold=1.0)
    model = gated_copy(tiny, "local_speaker_lang2vec")
    model.encoder.external_context.clear()
    with pytest.raises(ValueError, match="context 'speaker' is configured but was not given"):
        model.encoder(*speech([200]))
    with pytest.raises(ValueError, match="unknown context"):
        model.encoder.set_context(event=torch.randn(1, 768))
    model.train()
    set_execution(model, "compact")
    with pytest.raises(RuntimeError, match="train in masked mode"):
        model.encoder(*speech([200]))
    glob = gate_s2t_model(copy.deepcopy(tiny[0]), CONFIGS["global_utterance"])
    with pytest.raises(ValueError, match="call set_context\\(prompt=...\\)"):
        glob.encoder(*speech([200]))


def test_flops_reproduces_the_paper():
    medium = flops.encoder_macs(flops.EncoderShape.of_preset("medium"), flops.input_frames(30))
    assert abs(medium["total"] / 1e9 - 568.5) <= 0.5
    assert flops.subsampled_frames(flops.input_frames(30)) == 749
    half = flops.keep_ratio_macs(flops.EncoderShape.of_preset("small"), 3001, 0.5)
    dense = flops.encoder_macs(flops.EncoderShape.of_preset("small"), 3001)
    assert 0.76 < half["total"] / dense["total"] < 0.79  # the issue's ~0.77


def test_flops_cli(capsys):
    from localgp.cli import main

    assert main(["flops", "--preset", "medium", "--seconds", "30", "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert abs(report["encoder_gflops"] - 568.5) <= 0.5 and report["encoder_frames"] == 749
    assert main(["flops", "--preset", "small", "--keep", "0.5"]) == 0
    assert "total" in capsys.readouterr().out


@pytest.mark.parametrize("search_class", ["BatchBeamSearch", "BeamSearch"])
def test_espnet_beam_search_runs_on_the_gated_decoder(tiny, search_class):
    """ESPnet's beam searches score through the gated decoder (batch_score, forward_one_step);
    all-keep gives their hypotheses."""
    from espnet.nets.batch_beam_search import BatchBeamSearch
    from espnet.nets.beam_search import BeamSearch

    model, args = tiny
    token_list = args.token_list
    gated = gate_s2t_model(copy.deepcopy(model), CONFIGS["local_temporal_token"]).eval()
    force_keep(gated, 1.0)

    def search(m):
        search = {"BatchBeamSearch": BatchBeamSearch, "BeamSearch": BeamSearch}[search_class]
        beam = search(scorers=dict(decoder=m.decoder), weights=dict(decoder=1.0), beam_size=3,
                               vocab_size=len(token_list), sos=token_list.index("<sos>"),
                               eos=token_list.index("<eos>"), token_list=token_list, pre_beam_score_key="full")
        with torch.no_grad():
            enc, _, _ = m.encoder(*speech([300], seed=4))
            hyps = beam(enc[0], maxlenratio=-6, minlenratio=0.0)
        return [(h.yseq.tolist(), float(h.score)) for h in hyps]

    got, want = search(gated), search(model)
    assert [seq for seq, _ in got] == [seq for seq, _ in want]
    # batch_score recomputes the whole prefix; ESPnet's cache adds one token at a time.
    assert [score for _, score in got] == pytest.approx([score for _, score in want], rel=1e-5)


def test_snapshot_with_a_real_bpe_model(tmp_path):
    """A sentencepiece BPE model travels with the snapshot and is found again on load."""
    import sentencepiece as spm

    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"the quick brown fox number {i} jumps over the lazy dog" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "bpe"), vocab_size=40,
                                   model_type="bpe", minloglevel=2)
    pieces = [spm.SentencePieceProcessor(model_file=str(tmp_path / "bpe.model")).id_to_piece(i) for i in range(3, 40)]
    token_list = owsm.owsm_token_list(owsm.PRESETS["tiny"].vocab_size, pieces)
    model, args = owsm.build_owsm("tiny", token_list=token_list, bpemodel=str(tmp_path / "bpe.model"))
    owsm.write_checkpoint(model, args, tmp_path / "snap", bpemodel=tmp_path / "bpe.model")
    loaded, train_args = owsm.load_owsm(tmp_path / "snap")
    assert train_args.bpemodel == str(tmp_path / "snap" / owsm.BPE_PATH)
    assert train_args.token_list[2 : 2 + len(pieces)] == pieces
    tokenizer = spm.SentencePieceProcessor(model_file=train_args.bpemodel)
    assert tokenizer.encode("the lazy fox", out_type=str)
