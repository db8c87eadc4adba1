"""GateConfig.prior: a training-free rule (padding, silence) under learned encoder gates. The
rule's skipped frames are skipped in every module of every layer whatever the predictors say (in
training too, under Gumbel noise), the predictors decide the rest, the sparsity the loss targets
is of the rule's kept frames only, masked and compact execution agree, the dense teacher ignores
the prior; a run trained with one decodes with its rule (real Whisper base, real speech)."""

import dataclasses

import pytest
import torch

from localgp.model.config import GateConfig
from localgp.model.convert import force_keep, set_execution
from localgp.backbones.whisper.model import PADDING, SILENCE, SPEECH, gate_whisper, rule_keep
from localgp.model.config import Rule
from tests.test_rules import calibrated
from tests.test_whisper_model import DIMS, inputs, tiny_whisper
from tests.test_whisper_train import manifest, whisper_config  # noqa: F401 (manifest: the real clips' fixture)

T = DIMS.n_audio_ctx
PRIOR = GateConfig(encoder="temporal", decoder=None, contexts=(("front", 0),), inject=False, skip_fill="mean",
                   attention_keys="all", prior="silence:1")


def kinds_of_three():
    kinds = torch.full((3, T), PADDING, dtype=torch.int8)
    kinds[0, :12], kinds[0, 4:7] = SPEECH, SILENCE
    kinds[1, :] = SPEECH  # a full window
    kinds[2, :2] = SPEECH
    return kinds


def prior_model(config=PRIOR, seed=0):
    """A tiny Whisper under `config`, its predictors' weights drawn wide enough to skip about half
    of the frames they decide (fresh ones keep nearly all), the rule's frames set."""
    model = calibrated(gate_whisper(tiny_whisper(seed), config))
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.encoder.pruning.gates.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for gate in model.encoder.pruning.gates:  # no bias towards keeping
            gate.to_logits.bias.zero_()
    keep = rule_keep(Rule("silence", margin=1), kinds_of_three())
    model.encoder.set_rule_keep(keep)
    return model, keep


def test_the_rule_frames_are_skipped_in_training_and_the_sparsity_is_of_the_rest():
    model, keep = prior_model()
    model.train()
    mel, _ = inputs(B=3)
    torch.manual_seed(3)
    model.encoder(mel)
    record = model.encoder.last_record
    kept = decided = 0
    for name, mask in record.masks.items():
        assert not mask[~keep].any(), f"{name}: a frame the rule skips was kept"
        kept += float(mask.detach()[keep].sum())
        decided += int(keep.sum())
    skipped_decided = 1 - kept / decided
    assert 0 < skipped_decided < 1  # the predictors decided something both ways on the rule's frames
    torch.testing.assert_close(float(record.sparsity().detach()), skipped_decided, rtol=0, atol=1e-6)
    # the reports' view: every frame of the window, the rule's skipped ones counted as skipped
    everything = {k: 1 - sum(float(m.sum()) for n, m in record.masks.items() if n.endswith(k)) / (3 * T * DIMS.n_audio_layer)
                  for k in ("attn", "mlp")}
    for kind, share in record.sparsity_per_module().items():
        assert share == pytest.approx(everything[kind.split(".")[1]])
    # the gradient reaches the predictors through the decided frames only
    record.sparsity().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "pruning." in n)


@pytest.mark.parametrize("seed", [0, 2])
def test_masked_and_compact_agree_with_a_prior(seed):
    model, keep = prior_model(seed=seed)
    mel, _ = inputs(B=3, seed=seed + 5)
    with torch.no_grad():
        set_execution(model, "masked")
        masked = model.encoder(mel)
        masks = {k: m.clone() for k, m in model.encoder.last_record.masks.items()}
        set_execution(model, "compact")
        compact = model.encoder(mel)
    torch.testing.assert_close(compact, masked, rtol=1e-4, atol=1e-4)
    for name, mask in model.encoder.last_record.masks.items():
        assert torch.equal(mask.bool(), masks[name].bool()), name
        assert not mask.bool()[~keep].any()
    decided = torch.stack([m.bool()[keep] for m in masks.values()]).float().mean()
    assert 0.05 < decided < 0.95  # the predictors kept some of the rule's frames and skipped others


def test_the_dense_teacher_ignores_the_prior():
    model, keep = prior_model()
    mel, _ = inputs(B=3)
    force_keep(model, 1.0)
    with torch.no_grad():
        model.encoder(mel)
    assert all(bool(m.bool().all()) for m in model.encoder.last_record.masks.values())


def test_a_prior_needs_its_frames():
    model = calibrated(gate_whisper(tiny_whisper(), PRIOR))
    mel, _ = inputs(B=2)
    with pytest.raises(ValueError, match="set_rule_keep"):
        model.encoder(mel)
    model.encoder.set_rule_keep(torch.ones(3, T, dtype=torch.bool))
    with pytest.raises(ValueError, match="rule's frames of the batch"):
        model.encoder(mel)
    assert model.encoder.rule == Rule("silence", margin=1)


@pytest.mark.parametrize("changes, match", [
    ({"prior": "attention"}, "prior must be padding"),
    ({"prior": "silence:x"}, "integers for BLOCK and MARGIN"),
    ({"prior": 3}, "prior must be padding"),
    ({"prior": "padding", "encoder": "utterance"}, "per-frame predictors"),
])
def test_bad_priors(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(PRIOR, **changes)


def test_set_rule_keep_is_refused_without_a_rule():
    model = gate_whisper(tiny_whisper(), dataclasses.replace(PRIOR, prior=None))
    with pytest.raises(ValueError, match="no prior rule"):
        model.encoder.set_rule_keep(torch.ones(1, T, dtype=torch.bool))


def test_a_run_with_a_prior_trains_and_decodes_with_its_rule(manifest, whisper_base, tmp_path):
    from localgp.decode import decode_run
    from localgp.backbones.whisper.decoding import WhisperDecodeOptions
    from localgp.runs import load_run
    from localgp.train import Trainer

    config = whisper_config(tmp_path, "prior", manifest, whisper_base, max_steps=2, target_sparsity=0.5,
                            gates={"encoder": "temporal", "decoder": None, "contexts": [["front", 0]],
                                   "context_frames": 16, "predictor_width": 16, "inject": False, "skip_fill": "mean",
                                   "attention_keys": "all", "prior": "padding:4"},
                            context_extractors={}, tasks=("asr",))
    Trainer(config).train()
    run = load_run(config.out_dir)
    assert run.model.encoder.rule == Rule("padding", margin=4)
    records = decode_run(config.out_dir, tmp_path / "decoded.jsonl",
                         options=WhisperDecodeOptions(beam_size=1, sample_len=20))
    assert records
    for r in records:
        # every padding unit beyond the margin skipped by the rule: the audio's clips are 1-6 s of 30
        assert r.frames_skipped["padding"] > 0.95


STAND_IN = dataclasses.replace(PRIOR, stand_in_rank=4)


def trained_stand_ins(model, seed=11):
    """The stand-ins' output layers away from their zero start (as training moves them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.encoder.pruning.stand_ins.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 4.0)
    return model


def stand_in_reference(model, mel, masks, keep):
    """Every block: a kept frame adds its module's output; a skipped one the calibrated mean at its
    position, plus (where the rule keeps it) its stand-in's up(down(layer_norm(x)))."""
    import torch.nn.functional as F

    from tests.test_rules import embed
    from localgp.backbones.whisper.model import block_modules

    x = embed(model, mel)
    table = model.encoder.pruning.skip_values.values
    for index, block in enumerate(model.encoder.blocks):
        for m, name in enumerate(("attn", "mlp")):
            s = model.encoder.pruning.stand_ins[index][m]
            stand_in = s.up(s.down(F.layer_norm(x, x.shape[-1:]))) * keep[..., None]
            kept = masks[f"encoder.{index}.{name}"].bool()[..., None]
            x = x + torch.where(kept, block_modules(block)[name](x), table[index, m] + stand_in)
    return model.encoder.ln_post(x)


@pytest.mark.parametrize("execution", ["masked", "compact"])
def test_stand_ins_are_the_reference(execution):
    model, keep = prior_model(STAND_IN)
    trained_stand_ins(model)
    mel, _ = inputs(B=3, seed=4)
    set_execution(model, execution)
    with torch.no_grad():
        got = model.encoder(mel)
        masks = model.encoder.last_record.masks
        assert any(not m.bool()[keep].all() for m in masks.values())  # some decided frame skipped
        want = stand_in_reference(model, mel, masks, keep)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_stand_ins_start_as_the_fill_and_train():
    plain, keep = prior_model()
    model, _ = prior_model(STAND_IN)
    model.encoder.pruning.load_state_dict(plain.encoder.pruning.state_dict(), strict=False)
    mel, _ = inputs(B=3)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(mel), plain.encoder(mel), rtol=0, atol=0)
    model.train()
    model.encoder(mel).square().mean().backward()
    ups = [s.up.weight.grad for layer in model.encoder.pruning.stand_ins for s in layer]
    assert any(g is not None and g.abs().sum() > 0 for g in ups)  # those of the modules that skipped a frame
    assert all("pruning." in n for n, _ in model.named_parameters() if "stand_ins" in n)


@pytest.mark.parametrize("changes, match", [
    ({"stand_in_rank": 0}, "stand_in_rank must be a positive integer"),
    ({"stand_in_rank": 4, "encoder": "utterance", "prior": None}, "stand_in_rank must be a positive integer"),
])
def test_bad_stand_ins(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(PRIOR, **changes)


def test_stand_ins_count_in_the_executed_macs():
    from localgp import flops

    model, _ = prior_model(STAND_IN)
    mel, _ = inputs(B=3)
    set_execution(model, "compact")
    with torch.no_grad():
        model.encoder(mel)
    macs = flops.executed_whisper_encoder_macs(model.encoder)
    assert macs["stand_in"] == 3 * DIMS.n_audio_layer * 2 * T * 2 * DIMS.n_audio_state * 4
    assert macs["total"] == sum(v for k, v in macs.items() if k != "total")
