"""localgp's batched beam search against ESPnet's searches: the same hypotheses and scores for
a plain decoder (ESPnet's BatchBeamSearch) and for gated decoders (ESPnet's one-hypothesis-at-a-
time BeamSearch over the gated decoder's full-prefix masked forward), on small random models."""

from __future__ import annotations

import copy

import pytest
import torch
from espnet2.bin.s2t_inference import ScoreFilter

from localgp.backbones.owsm.decoder import espnet_decoder_view
from localgp.backbones.owsm.decoding import BatchBeamSearch
from localgp.decoding import DecodeOptions, IncrementalDecoder
from localgp.backbones.owsm import weights as owsm
from localgp.model.config import GateConfig
from localgp.backbones.owsm.model import gate_s2t_model
from localgp.model.convert import force_keep, set_execution
from tests.test_model import speech

GATED = {
    "token": GateConfig(encoder="temporal", decoder="token"),
    "utterance": GateConfig(encoder="utterance", decoder="utterance"),
    "global": GateConfig(predictor="global", encoder="utterance", decoder="utterance"),
    "token_lang2vec": GateConfig(encoder="temporal", decoder="token", decoder_contexts=(("lang2vec", 289),)),
    # predictors attending in 16 dimensions: the incremental step projects in and out as forward does
    "token_narrow": GateConfig(encoder="temporal", decoder="token", predictor_width=16),
}
LENGTHS = [20, 14, 9]  # encoder frames of the utterances decoded together


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, args = owsm.build_owsm("tiny")
    return model.eval(), args.token_list


def primer(token_list, lang="en", task="<asr>"):
    return [token_list.index("<sos>"), token_list.index(f"<{lang}>"), token_list.index(task),
            token_list.index("<notimestamps>")]


def espnet_search(model, token_list, search_class, beam, ctc_weight=0.0, penalty=0.0):
    """ESPnet's search with the scorers and weights of its S2T inference (espnet2/bin/s2t_inference.py)."""
    from espnet.nets.batch_beam_search import BatchBeamSearch as EspnetBatch
    from espnet.nets.beam_search import BeamSearch as EspnetBeam
    from espnet.nets.scorers.ctc import CTCPrefixScorer
    from espnet.nets.scorers.length_bonus import LengthBonus

    scorers = dict(decoder=model.decoder, length_bonus=LengthBonus(len(token_list)),
                   scorefilter=ScoreFilter(token_list.index("<notimestamps>"), token_list.index("<0.00>"),
                                           token_list.index("<30.00>"), model.sos, model.eos, len(token_list)))
    weights = dict(decoder=1 - ctc_weight, scorefilter=1.0, length_bonus=penalty)
    if ctc_weight:
        scorers["ctc"], weights["ctc"] = CTCPrefixScorer(model.ctc, model.eos), ctc_weight
    cls = {"batch": EspnetBatch, "single": EspnetBeam}[search_class]
    return cls(scorers=scorers, weights=weights, beam_size=beam, vocab_size=len(token_list), sos=model.sos,
               eos=model.eos, token_list=token_list, pre_beam_score_key="full")


def assert_same(got, want, rel=1e-5):
    assert [h.yseq for h in got] == [h.yseq.tolist() for h in want]
    assert [h.score for h in got] == pytest.approx([float(h.score) for h in want], rel=rel, abs=1e-4)


def memory(seed, lengths=LENGTHS, width=64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(len(lengths), max(lengths), width, generator=gen), torch.tensor(lengths)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ctc_weight,penalty,maxlenratio", [(0.0, 0.0, 0.0), (0.0, 0.5, 0.0), (0.3, 0.0, -5)])
def test_dense_equals_espnet_batch_beam_search(tiny, seed, ctc_weight, penalty, maxlenratio):
    model, token_list = tiny
    mem, lens = memory(seed)
    beam = 3
    options = DecodeOptions(beam_size=beam, nbest=beam, ctc_weight=ctc_weight, penalty=penalty, maxlenratio=maxlenratio)
    prompts = torch.tensor([primer(token_list, lang) for lang in ("en", "fr", "de")])
    got = BatchBeamSearch(model, options)(mem, lens, prompts)
    search = espnet_search(model, token_list, "batch", beam, ctc_weight, penalty)
    for a, n in enumerate(LENGTHS):
        search.set_hyp_primer(prompts[a].tolist())
        with torch.no_grad():
            want = search(mem[a, :n], maxlenratio=maxlenratio, minlenratio=0.0)
        assert_same(got[a], want[:beam])
        assert got[a][0].keep is None  # an ungated decoder has no gates


def gated_model(tiny, name, seed):
    """A gated copy with random ('trained') decoder predictors, so decisions vary per token."""
    model = gate_s2t_model(copy.deepcopy(tiny[0]), GATED[name]).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "pruning." in key:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", sorted(GATED))
def test_gated_equals_one_hypothesis_at_a_time_masked_search(tiny, name, seed):
    """Batched compact and masked decoding against ESPnet's BeamSearch scoring every hypothesis
    alone through the gated decoder's masked full-prefix forward."""
    model = gated_model(tiny, name, seed)
    token_list = tiny[1]
    mem, lens = memory(100 + seed)
    lang2vec = torch.randn(len(LENGTHS), 289, generator=torch.Generator().manual_seed(seed))
    if name == "token_lang2vec":
        model.decoder.set_context(lang2vec=lang2vec)
    if name == "global":  # globalGP decides from the prompt and the encoder input
        model.encoder.set_context(prompt=torch.tensor([primer(token_list)[1:3]] * len(LENGTHS)))
        with torch.no_grad():
            mem, lens, _ = model.encoder(*speech([4 * n + 3 for n in LENGTHS], seed=seed))
    beam = 3
    prompts = torch.tensor([primer(token_list)] * len(LENGTHS))
    got = {execution: BatchBeamSearch(model, DecodeOptions(beam_size=beam, nbest=beam, execution=execution))(
        mem, lens, prompts) for execution in ("compact", "masked")}
    set_execution(model, "masked")
    search = espnet_search(model, token_list, "single", beam)
    search.set_hyp_primer(prompts[0].tolist())
    kept = []
    for a, n in enumerate(lens.tolist()):
        if name == "token_lang2vec":
            model.decoder.set_context(lang2vec=lang2vec[a : a + 1])
        if name == "global":
            full_logits = model.encoder.decoder_logits
            model.encoder.decoder_logits = full_logits[a : a + 1]
        with torch.no_grad():
            want = search(mem[a, :n], maxlenratio=0.0, minlenratio=0.0)
        if name == "global":
            model.encoder.decoder_logits = full_logits
        for execution in got:
            assert_same(got[execution][a], want[:beam])
        best = got["compact"][a][0]
        # one row per fed position; at the length limit the last token was never fed
        assert best.keep.shape[1:] == (2, 3) and best.keep.shape[0] in (len(best.yseq) - 1, len(best.yseq) - 2)
        assert torch.equal(best.keep, got["masked"][a][0].keep)
        kept.append(best.keep.float().mean())
    if name == "token":
        assert 0 < torch.stack(kept).mean() < 1  # the gates did prune something, and not everything


def count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls, handle


@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
def test_compact_runs_modules_only_on_rows_that_keep_them(tiny, keep):
    model = gate_s2t_model(copy.deepcopy(tiny[0]), GATED["token"]).eval()
    token_list = tiny[1]
    mem, lens = memory(7, [12, 12])
    steps, beam = 6, 4
    layer = model.decoder.decoders[1]
    calls = {name: count_calls(getattr(layer, name)) for name in ("feed_forward", "src_attn")}
    q_calls = count_calls(layer.self_attn.linear_q)
    k_calls = count_calls(layer.self_attn.linear_k)
    force_keep(model, keep, seed=3)
    options = DecodeOptions(beam_size=beam, fixed_length=steps)
    hyps = BatchBeamSearch(model, options)(mem, lens, torch.tensor([primer(token_list)] * 2))
    for calls_, handle in (*calls.values(), q_calls, k_calls):
        handle.remove()
    rows = 2 * (3 + 1 + beam * (steps - 1))  # primer (1 row each), first step (1 row), then beam rows
    assert sum(k_calls[0]) == rows  # keys/values of every token, kept or not
    if keep == 0.0:  # no row keeps them: the modules are never entered
        assert q_calls[0] == [] and calls["feed_forward"][0] == [] and calls["src_attn"][0] == []
    elif keep == 1.0:
        assert sum(q_calls[0]) == rows and sum(calls["feed_forward"][0]) == rows
    else:
        assert 0 < sum(calls["feed_forward"][0]) < rows and 0 < sum(q_calls[0]) < rows
    for utterance in hyps:
        assert len(utterance[0].token_ids) == steps and utterance[0].yseq[-1] == model.eos


@pytest.mark.parametrize("whole_modules", [False, True], ids=["row_sets", "whole_modules"])
@pytest.mark.parametrize("keep", [0.3, 0.7])
def test_forced_masks_compact_equals_masked(tiny, keep, whole_modules, monkeypatch):
    """Benchmark masks (random per token and module) give the same search in both executions;
    also when modules run on every row or none (what a GPU does at few rows)."""
    from localgp.decoding.incremental import IncrementalDecoder

    monkeypatch.setattr(IncrementalDecoder, "whole_modules", lambda self, keep: whole_modules)
    model = gate_s2t_model(copy.deepcopy(tiny[0]), GATED["token"]).eval()
    mem, lens = memory(11, [16, 10, 7, 16])
    prompts = torch.tensor([primer(tiny[1])] * 4)
    out = {}
    for execution in ("masked", "compact"):
        force_keep(model, keep, seed=5)
        out[execution] = BatchBeamSearch(model, DecodeOptions(beam_size=4, nbest=2, execution=execution,
                                                              fixed_length=8))(mem, lens, prompts)
    for a in range(4):
        assert [h.yseq for h in out["compact"][a]] == [h.yseq for h in out["masked"][a]]
        assert [h.score for h in out["compact"][a]] == pytest.approx([h.score for h in out["masked"][a]], rel=1e-5)


def test_packed_output_layer_follows_the_weight(tiny, monkeypatch):
    """With the decoder's linears packed (pack_linears: what decode runs on the CPU) the output
    layer multiplies by oneDNN's packed copy of its weight; changing the weight in place (an
    optimizer step, load_state_dict) must renew it."""
    from localgp.model import packed

    model = copy.deepcopy(tiny[0])
    assert IncrementalDecoder(model.decoder, espnet_decoder_view(model.decoder)).packed_output is None  # unpacked: the model's own linear
    packed.pack_linears(model)
    decoder = IncrementalDecoder(model.decoder, espnet_decoder_view(model.decoder))
    layer = model.decoder.output_layer
    x = torch.randn(5, layer.in_features)
    calls = []
    real = packed.linear
    monkeypatch.setattr(packed, "linear", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        for _ in range(2):
            assert torch.allclose(decoder._output_layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias),
                                  rtol=1e-5, atol=1e-5)
            layer.weight.mul_(-2.0)
        model.decoder.load_state_dict(tiny[0].decoder.state_dict())
        assert torch.allclose(decoder._output_layer(x), tiny[0].decoder.output_layer(x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 3


def test_bad_options_and_inputs(tiny):
    model, token_list = tiny
    for bad, message in [(dict(beam_size=0), "beam_size"), (dict(nbest=6), "nbest"), (dict(ctc_weight=1.0), "ctc_weight"),
                         (dict(execution="fast"), "execution"), (dict(fixed_length=0), "fixed_length")]:
        with pytest.raises(ValueError, match=message):
            DecodeOptions(**bad)
    search = BatchBeamSearch(model, DecodeOptions(beam_size=2))
    mem, lens = memory(0, [5, 5])
    with pytest.raises(ValueError, match="primers must be"):
        search(mem, lens, torch.tensor([primer(token_list)]))
    with pytest.raises(ValueError, match="<notimestamps>"):
        search(mem, lens, torch.tensor([primer(token_list)[:3]] * 2))
    with pytest.raises(ValueError, match="<sos>"):
        search(mem, lens, torch.tensor([primer(token_list)[1:]] * 2))
    with pytest.raises(ValueError, match="memory_lens"):
        search(mem, lens[:1], torch.tensor([primer(token_list)] * 2))
