"""The decoder parts of `localgp bench` (see bench.py for providers, timing and rows).

- `decode`: a whole beam search of `batch` utterances x `beam` hypotheses for `tokens` steps
  (<eos> forbidden until then, so every provider decodes the same number of steps), on an
  encoder output of `seconds` of audio (random values of the encoder's shape: the encoder is
  its own part).
- `decoder-step`: one step of the batch x beam rows after a prefix of `tokens` tokens.

Providers: `espnet` is ESPnet's BatchBeamSearch / TransformerDecoder.batch_score on the plain
decoder, one utterance after another (as its S2T inference runs); `dense` is localgp's decoder on
the same plain decoder; `masked` and `compact` run the gated decoder with token-level masks
forced at random per token and module, or with the trained gates of a checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor
from espnet.nets.scorer_interface import BatchScorerInterface

from localgp import flops
from localgp.bench.core import GATES, BenchError, Case, Setting, check, timed_interleaved
from localgp.backbones.owsm.bench import PROVIDERS
from localgp.model.pruning import ungated_copy
from localgp.backbones.owsm.decoder import espnet_decoder_view
from localgp.backbones.owsm.decoding import BatchBeamSearch
from localgp.decoding import MODULES, DecodeOptions, DecoderCache, IncrementalDecoder, RowSet
from localgp.backbones.owsm import weights as owsm
from localgp.model.config import GateConfig


class NoEos(BatchScorerInterface, torch.nn.Module):
    """An ESPnet batch scorer that forbids <eos>, so ESPnet decodes exactly its length limit."""

    def __init__(self, eos: int, vocab: int):
        super().__init__()
        self.eos, self.vocab = eos, vocab
        self.param = torch.nn.Parameter(torch.zeros(()))  # for ESPnet's dtype/device moves

    def _scores(self, rows: int) -> torch.Tensor:
        scores = torch.zeros(rows, self.vocab, dtype=self.param.dtype, device=self.param.device)
        scores[:, self.eos] = float("-inf")
        return scores

    def init_state(self, x):
        return None

    def batch_init_state(self, x):
        return None

    def select_state(self, state, i, new_id=None):
        return None

    def score(self, y, state, x):
        return self._scores(1)[0], None

    def batch_score(self, ys, states, xs):
        return self._scores(ys.shape[0]), [None] * ys.shape[0]


def espnet_step_macs(D: int, layers: int, rows: int, prefix: int, frames: int, ffn_units: int, vocab: int) -> int:
    """ESPnet's cached decoder step: every hypothesis re-projects the whole prefix into
    self-attention keys/values and the memory into src-attention keys/values."""
    layer = (4 * D * D + 2 * (prefix - 1) * D * D + 2 * prefix * D  # self-attn: q,k,v,out + prefix k,v + core
             + 2 * D * D + 2 * frames * D * D + 2 * frames * D  # src-attn: q,out + memory k,v + core
             + 2 * D * ffn_units)
    return rows * (layers * layer + D * vocab)


class DecoderModels:
    """The plain model (espnet, dense) and its gated copy (masked, compact) on the same weights."""

    def __init__(self, setting: Setting):
        from localgp.backbones.owsm.model import gate_s2t_model

        torch.manual_seed(setting.seed)
        device, dtype = setting.torch_device(), setting.torch_dtype()
        if setting.checkpoint:
            from localgp.runs import load_trained

            gated, _, config = load_trained(setting.checkpoint)
            cfg = getattr(gated.decoder, "pruning", None)
            if cfg is None or cfg.config.decoder != "token" or cfg.config.predictor != "local" \
                    or cfg.config.decoder_contexts:
                raise BenchError(f"--checkpoint {setting.checkpoint}: the decoder parts need token-level localGP "
                                 "decoder gates on the encoder output (no external decoder context)")
            plain = copy.deepcopy(gated)
            plain.decoder = ungated_copy(gated.decoder)
            self.masks, self.token_list = GATES, list(gated.token_list)
            self.preset = f"init:{Path(config.init).name}" if config.init else config.preset
        else:
            plain, args = owsm.build_owsm(setting.preset)
            gated = gate_s2t_model(copy.deepcopy(plain), GateConfig(encoder=None, decoder="token"))
            self.masks, self.token_list, self.preset = "random", args.token_list, setting.preset
        self.plain = plain.to(device, dtype).eval()
        self.gated = gated.to(device, dtype).eval()
        tl = self.token_list
        self.primer = [plain.sos, tl.index("<en>"), tl.index("<asr>"), tl.index("<notimestamps>")]
        d_model = plain.decoder.decoders[0].size
        self.frames = flops.subsampled_frames(flops.input_frames(setting.seconds))
        gen = torch.Generator().manual_seed(setting.seed)
        self.memory = torch.randn(setting.batch, self.frames, d_model, generator=gen).to(device, dtype)
        self.lengths = torch.full((setting.batch,), self.frames, device=device)
        self.d_model, self.vocab = d_model, plain.vocab_size
        self.ffn_units = plain.decoder.decoders[0].feed_forward.w_1.out_features
        self.shapes = dict(preset=self.preset, d_model=d_model, layers=len(plain.decoder.decoders), heads=plain.decoder.decoders[0].self_attn.h,
                           vocab=self.vocab, frames=self.frames, beam=setting.beam, tokens=setting.tokens)

    def prepare(self, provider: str, keep: float | None, seed: int):
        """The model for `provider`, its masks set (reseeded: the same masks in every call)."""
        from localgp.model.convert import force_keep

        if provider in ("espnet", "dense"):
            return self.plain
        force_keep(self.gated, keep, seed=seed)
        return self.gated


class DecoderWorkload:
    """What both decoder parts share: the models, the providers, the row columns."""

    providers = PROVIDERS
    pruned = f"{','.join(MODULES)} (token)"

    def __init__(self, setting: Setting):
        self.setting = setting
        self.models = DecoderModels(setting)
        self.masks, self.shapes = self.models.masks, self.models.shapes


class DecodeWorkload(DecoderWorkload):
    """A whole beam search of `tokens` steps."""

    def case(self, provider: str, keep: float | None) -> Case:
        s, m = self.setting, self.models
        if provider == "espnet":
            return self._espnet()
        options = DecodeOptions(beam_size=s.beam, fixed_length=s.tokens,
                                execution="compact" if provider == "dense" else provider)
        # Built once, outside the timed call (it scans the 50k-token list for timestamp tokens).
        search = BatchBeamSearch(m.prepare(provider, keep, s.seed), options)
        primers = torch.tensor([m.primer] * s.batch, device=m.memory.device)

        def run():
            m.prepare(provider, keep, s.seed)  # reseeds the forced masks: the same ones every call
            return search(m.memory, m.lengths, primers)

        return Case(run, lambda: search.decoder.macs / 1e9, lambda: search.kept_share)

    def _espnet(self) -> Case:
        from espnet.nets.batch_beam_search import BatchBeamSearch as EspnetBatchBeamSearch

        s, m = self.setting, self.models
        search = EspnetBatchBeamSearch(
            scorers=dict(decoder=m.plain.decoder, no_eos=NoEos(m.plain.eos, m.vocab)),
            weights=dict(decoder=1.0, no_eos=1.0), beam_size=s.beam, vocab_size=m.vocab, sos=m.plain.sos,
            eos=m.plain.eos, pre_beam_score_key="full").to(m.memory.device, m.memory.dtype).eval()
        search.set_hyp_primer(m.primer)

        def run():
            return [search(m.memory[b], maxlenratio=-s.tokens, minlenratio=0.0) for b in range(s.batch)]

        def gflops():
            P, layers = len(m.primer), self.shapes["layers"]
            per_utterance = sum(  # 1 hypothesis at the first step, then the beam
                espnet_step_macs(m.d_model, layers, 1 if i == 0 else s.beam, P + i, m.frames, m.ffn_units, m.vocab)
                for i in range(s.tokens))
            return s.batch * per_utterance / 1e9

        return Case(run, gflops)


class DecoderStepWorkload(DecoderWorkload):
    """One step of batch x beam rows after a prefix of `tokens` tokens (the cache is rewound
    after each call, so every call does the same step)."""

    def prefix(self) -> Tensor:
        """(batch, beam, tokens) token ids: the primer, then random text tokens."""
        s, m = self.setting, self.models
        gen = torch.Generator().manual_seed(s.seed)
        prefix = torch.randint(0, m.primer[-1], (s.batch, s.beam, s.tokens), generator=gen).to(m.memory.device)
        prefix[:, :, : len(m.primer)] = torch.tensor(m.primer)
        return prefix

    def prefixed_cache(self, incremental: IncrementalDecoder, prefix: Tensor) -> DecoderCache:
        """A cache of batch x beam rows holding all but the last token of `prefix`."""
        s, m = self.setting, self.models
        cache = incremental.start(m.memory, m.lengths)
        for t in range(s.tokens - 1):  # one row per utterance for the first token, as the search
            if t == 1:
                cache.reorder(torch.arange(s.batch, device=m.memory.device).repeat_interleave(s.beam))
            incremental.step(cache, prefix[:, :, t].flatten() if t else prefix[:, 0, 0], logits=False)
        return cache

    def case(self, provider: str, keep: float | None) -> Case:
        s, m = self.setting, self.models
        rows = s.batch * s.beam
        prefix = self.prefix()
        model = m.prepare(provider, keep, s.seed)
        if provider == "espnet":
            decoder = model.decoder
            ys = prefix.flatten(0, 1)
            xs = m.memory.repeat_interleave(s.beam, dim=0)
            _, states = decoder.batch_score(ys[:, :-1], [None] * rows, xs)

            def gflops():
                return espnet_step_macs(m.d_model, self.shapes["layers"], rows, s.tokens, m.frames, m.ffn_units,
                                        m.vocab) / 1e9

            return Case(lambda: decoder.batch_score(ys, states, xs), gflops)
        incremental = IncrementalDecoder(model.decoder, espnet_decoder_view(model.decoder), "compact" if provider == "dense" else provider)
        cache = self.prefixed_cache(incremental, prefix)
        saved = (cache.ancestry, cache.length, cache.used)
        last = prefix[:, :, -1].flatten()

        kept = {}

        def run():
            m.prepare(provider, keep, s.seed)  # reseeds the forced masks: the same ones every call
            incremental.macs = 0
            out = incremental.step(cache, last)
            if incremental.gated:
                kept["share"] = float(cache.keep_slab[saved[2] : cache.used].float().mean())
            cache.ancestry, cache.length, cache.used = saved
            return out

        return Case(run, lambda: incremental.macs / 1e9, lambda: kept.get("share"))


def module_costs(setting: Setting, keep: float, repeats: int, warmup: int = 2) -> dict:
    """The most that skipping can save in one decoder step on this machine.

    After a prefix of `tokens` tokens, each gated module of every layer is timed on all
    batch x beam rows and on a random `keep` share of them by the compact path (gather, module,
    scatter-add); the whole dense and compact steps are timed beside them. Skipping saves at
    most the sum of the modules' differences, so `best_speedup` = dense / (dense - saving) is
    what no implementation of token-level skipping beats here: on a CPU a module's cost falls
    less than its rows (its weights are read whatever the rows; src-attention reads each
    utterance's memory keys/values whatever its rows).
    """
    check(setting, "decoder-step", ("dense", "compact"), repeats, warmup)
    if not 0.0 < keep < 1.0:
        raise BenchError(f"--keep must be in (0, 1) for the module costs, got {keep}")
    workload = DecoderStepWorkload(setting)
    m = workload.models
    incremental = IncrementalDecoder(m.plain.decoder, espnet_decoder_view(m.plain.decoder))
    cache = workload.prefixed_cache(incremental, workload.prefix())
    rows, R = cache.rows, cache.rows_per_utterance
    gen = torch.Generator().manual_seed(setting.seed)
    x = torch.randn(rows, m.d_model, generator=gen).to(m.memory.device, m.memory.dtype)

    def kept_rows() -> RowSet:
        index = torch.nonzero(torch.rand(rows, generator=gen) < keep).flatten()
        counts = torch.bincount(index // R, minlength=rows // R).tolist()
        return RowSet(index.to(x.device), counts)

    def module_call(index: int, module: str, rows_: RowSet | None):
        """The compact path of one module on its rows, scatter-added (IncrementalDecoder._layer)."""
        with torch.no_grad():  # every row's, untimed: the keys/values need it in any case
            h = m.plain.decoder.decoders[index].norm1(x)

        def call():
            y = incremental.branch(module, index, x, h, cache, rows_)
            return x + y if rows_ is None else x.index_add(0, rows_.index, y)

        return call

    calls, kept_counts = {}, {}
    for index in range(len(m.plain.decoder.decoders)):
        for module in MODULES:
            subset = kept_rows()
            kept_counts[(index, module)] = subset.index.numel()
            calls[(index, module, "all")] = module_call(index, module, None)
            if subset.index.numel():
                calls[(index, module, "kept")] = module_call(index, module, subset)
    steps = {provider: workload.case(provider, None if provider == "dense" else keep).run
             for provider in ("dense", "compact")}
    with torch.no_grad():
        times = timed_interleaved({**calls, **{("step", p): fn for p, fn in steps.items()}}, repeats, warmup,
                                  m.memory.device)
    median = {key: float(torch.tensor(t).median()) for key, t in times.items()}
    modules = []
    for module in MODULES:
        keys = [k for k in calls if k[1] == module and k[2] == "all"]
        all_ms = sum(median[k] for k in keys)
        kept_ms = sum(median.get((k[0], module, "kept"), 0.0) for k in keys)
        share = sum(kept_counts[(k[0], module)] for k in keys) / (rows * len(keys))
        modules.append(dict(module=module, rows=rows, kept_share=share, all_ms=all_ms, kept_ms=kept_ms,
                            time_share=kept_ms / all_ms))
    dense, compact = median[("step", "dense")], median[("step", "compact")]
    best = dense - sum(row["all_ms"] - row["kept_ms"] for row in modules)
    return dict(setting=dict(preset=m.preset, batch=setting.batch, beam=setting.beam, tokens=setting.tokens,
                             dtype=setting.dtype, device=str(m.memory.device), keep=keep, repeats=repeats),
                modules=modules, dense_step_ms=dense, compact_step_ms=compact, best_step_ms=best,
                best_speedup=dense / best, measured_speedup=dense / compact)
