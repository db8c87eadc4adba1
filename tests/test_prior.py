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
from localgp.model.whisper import PADDING, SILENCE, SPEECH, gate_whisper, rule_keep
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
    model = calibrated(gate_whisper(tiny_whisper(seed), config))
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
    torch.testing.assert_close(float(record.sparsity()), skipped_decided, rtol=0, atol=1e-6)
    # the reports' view: every frame of the window, the rule's skipped ones counted as skipped
    everything = {k: 1 - sum(float(m.sum()) for n, m in record.masks.items() if n.endswith(k)) / (3 * T * DIMS.n_audio_layer)
                  for k in ("attn", "mlp")}
    for kind, share in record.sparsity_per_module().items():
        assert share == pytest.approx(everything[kind.split(".")[1]])
    # the gradient reaches the predictors through the decided frames only
    record.sparsity().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "pruning." in n)


@pytest.mark.parametrize("seed", [0, 1])
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
    from localgp.decoding.whisper import WhisperDecodeOptions
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
