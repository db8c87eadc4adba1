"""localgp's beam search: B utterances x K hypotheses decoded as one batch of rows, with caches,
and token-level gates that really skip pruned modules.

- `IncrementalDecoder` runs ESPnet's TransformerDecoder (plain or gated) one token per row and
  step. Self-attention keys/values are written once per token into a slot buffer and each row
  reads its prefix through its ancestry (slot ids), so beam selection never copies the cache.
  The memory is projected to src-attention keys/values once per utterance (ESPnet re-projects it
  for every hypothesis at every step).
- With gates, each layer groups the rows whose masks agree (`group_rows`); a module runs only on
  the rows that keep it and its weights are not touched when no row does. A row that skips
  self-attention still writes its keys/values, so later tokens see what they see in the masked
  reference (the gated decoder's full-prefix forward).
- `BatchBeamSearch` is ESPnet's beam search (its scores, `<eos>` handling, length limits, end
  detection, optional CTC prefix scores) for every utterance at once; an utterance that is done
  leaves the batch.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from localgp import ops
from localgp.gates import gate_mask, random_keep_logits
from localgp.model.attention import heads, memory_attention
from localgp.model.config import EXECUTIONS
from localgp.model.decoder import GatedTransformerDecoder
from localgp.model.gating import profiled

log = logging.getLogger(__name__)

MODULES = ("self_attn", "src_attn", "ffn")  # the gated modules of a decoder layer, in order


@dataclass(frozen=True)
class DecodeOptions:
    beam_size: int = 5  # hypotheses kept per utterance
    nbest: int = 1  # hypotheses returned per utterance, best first
    ctc_weight: float = 0.0  # weight of CTC prefix scores; the decoder gets 1 - ctc_weight (as ESPnet)
    pre_beam_ratio: float = 1.5  # with CTC, only each hypothesis' best int(ratio * beam) tokens get CTC scores
    penalty: float = 0.0  # length bonus added per output token (ESPnet's length_bonus weight)
    # 0: at most one token per encoder frame, and ESPnet's end detection; > 0: at most this ratio of
    # the encoder frames; < 0: at most -maxlenratio tokens.
    maxlenratio: float = 0.0
    minlenratio: float = 0.0  # shortest accepted hypothesis: ratio of encoder frames, or -N tokens
    # Benchmarks: exactly this many steps for every utterance (<eos> is never chosen; it is appended
    # after the last step, as ESPnet does at its length limit). None: decode normally.
    fixed_length: int | None = None
    # Gated decoders: "compact" skips pruned modules, "masked" computes them and multiplies by the mask.
    execution: str = "compact"

    def __post_init__(self):
        if self.beam_size < 1:
            raise ValueError(f"DecodeOptions.beam_size must be >= 1, got {self.beam_size}")
        if not 1 <= self.nbest <= self.beam_size:
            raise ValueError(f"DecodeOptions.nbest must lie in [1, beam_size={self.beam_size}], got {self.nbest}")
        if not 0 <= self.ctc_weight < 1:
            raise ValueError(f"DecodeOptions.ctc_weight must lie in [0, 1), got {self.ctc_weight}")
        if self.pre_beam_ratio < 1:
            raise ValueError(f"DecodeOptions.pre_beam_ratio must be >= 1, got {self.pre_beam_ratio}")
        if self.fixed_length is not None and self.fixed_length < 1:
            raise ValueError(f"DecodeOptions.fixed_length must be >= 1 or None, got {self.fixed_length}")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"DecodeOptions.execution must be one of {EXECUTIONS}, got {self.execution!r}")


@dataclass
class Hypothesis:
    yseq: list[int]  # primer, output tokens, <eos>
    score: float  # the weighted sum of log-probabilities (ESPnet's Hypothesis.score)
    primer_length: int
    # (positions, layers, modules) bool: the gates of each fed position (primer included), for
    # gated decoders; the last output token has none when the length limit ended the hypothesis.
    keep: Tensor | None = None
    slots: Tensor | None = field(default=None, repr=False)  # where `keep` is read from, until it is

    @property
    def token_ids(self) -> list[int]:
        """The output tokens, without primer and <eos>."""
        return self.yseq[self.primer_length : -1]


class RowSet(NamedTuple):
    """The rows a module runs on: their index (ascending, so grouped by utterance) and how many
    of them each utterance has."""

    index: Tensor
    counts: list[int]


class DecoderCache:
    """What the decoder keeps between steps. Rows are utterance-major, `rows_per_utterance` each.

    Every token written gets a slot; `ancestry` (rows, positions) holds the slots of each row's
    prefix. Beam selection re-orders `ancestry` (a few integers per row), not the caches.
    """

    def __init__(self, layers: int, utterances: int, heads_: int, head_dim: int, modules: int, like: Tensor):
        self.utterances, self.rows_per_utterance = utterances, 1
        self.length = 0  # positions fed so far
        self.used = 0  # slots written so far
        self.capacity = max(64, 8 * utterances)
        self.kv = [like.new_empty(self.capacity, 2, heads_, head_dim) for _ in range(layers)]
        self.keep_slab = torch.zeros(self.capacity, layers, modules, dtype=torch.bool, device=like.device)
        self.ancestry = torch.empty(utterances, 0, dtype=torch.long, device=like.device)
        self.src: list[tuple[Tensor, Tensor]] = []  # per layer (A, H, S, Dh) keys and values
        self.memory_allowed: Tensor | None = None  # (A, S) True = a real frame; None: all are
        self.gate_context: list[tuple] = []  # per layer: LocalGatePredictor.project_context()
        self.utterance_keep: Tensor | None = None  # (rows, layers, modules) utterance-wise decisions

    @property
    def rows(self) -> int:
        return self.utterances * self.rows_per_utterance

    def new_slots(self) -> Tensor:
        """Slots for this step's tokens, one per row, appended to every row's ancestry."""
        n = self.rows
        if self.used + n > self.capacity:  # grow by doubling: amortised O(1) copies per slot
            self.capacity = max(2 * self.capacity, self.used + n)
            self.kv = [torch.cat([kv, kv.new_empty(self.capacity - kv.shape[0], *kv.shape[1:])]) for kv in self.kv]
            slab = self.keep_slab
            self.keep_slab = torch.cat([slab, slab.new_zeros(self.capacity - slab.shape[0], *slab.shape[1:])])
        slots = torch.arange(self.used, self.used + n, device=self.ancestry.device)
        self.used += n
        self.ancestry = torch.cat([self.ancestry, slots[:, None]], dim=1)
        self.length += 1
        return slots

    def reorder(self, rows: Tensor, utterances: list[int] | None = None) -> None:
        """Row i of the next step continues row rows[i]; `utterances`: indices of the current
        utterances that go on (None: all); each then has len(rows) / their number rows."""
        self.ancestry = self.ancestry.index_select(0, rows)
        if self.utterance_keep is not None:
            self.utterance_keep = self.utterance_keep.index_select(0, rows)
        if utterances is not None and len(utterances) != self.utterances:
            index = torch.tensor(utterances, device=rows.device)
            self.src = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.src]
            if self.memory_allowed is not None:
                self.memory_allowed = self.memory_allowed.index_select(0, index)
            self.gate_context = [
                (k.index_select(0, index), v.index_select(0, index), None if a is None else a.index_select(0, index))
                for k, v, a in self.gate_context
            ]
            self.utterances = len(utterances)
        if rows.numel() % self.utterances:
            raise ValueError(f"reorder: {rows.numel()} rows do not split evenly over {self.utterances} utterances")
        self.rows_per_utterance = rows.numel() // self.utterances


class IncrementalDecoder:
    """ESPnet's TransformerDecoder (plain, or gated by localgp) one token per row and step."""

    def __init__(self, decoder, execution: str = "compact"):
        layer = decoder.decoders[0]
        if not layer.normalize_before or layer.concat_after:
            raise ValueError("IncrementalDecoder: only pre-norm layers without concat_after are supported (as in OWSM)")
        if not isinstance(decoder.embed, torch.nn.Sequential) or not hasattr(decoder.embed[1], "pe"):
            raise ValueError("IncrementalDecoder: the decoder's input layer must be ESPnet's 'embed' "
                             "(Embedding + PositionalEncoding)")
        if execution not in EXECUTIONS:
            raise ValueError(f"IncrementalDecoder: execution must be one of {EXECUTIONS}, got {execution!r}")
        self.decoder, self.execution = decoder, execution
        self.macs = 0  # multiply-accumulates executed since the last start() (benchmarks)
        self.gated = isinstance(decoder, GatedTransformerDecoder)  # gate_decoder() refuses an ungated config
        self.config = decoder.pruning.config if self.gated else None
        self._output_weight_t = None  # (version of the weight, its (D, V) copy): see _output_layer

    # ------------------------------------------------------------------ set-up
    def start(self, memory: Tensor, memory_lens: Tensor) -> DecoderCache:
        """memory (A, S, D) encoder output; memory_lens (A,). One row per utterance to begin with."""
        dec = self.decoder
        attn = dec.decoders[0].self_attn
        cache = DecoderCache(len(dec.decoders), memory.shape[0], attn.h, attn.d_k, len(MODULES), memory)
        with profiled("memory_kv"):
            self._project_memory(cache, memory, memory_lens)
        dec.embed[1].extend_pe(memory.new_empty(1, 1))  # moves the positional table to memory's dtype/device
        return cache

    def _project_memory(self, cache: DecoderCache, memory: Tensor, memory_lens: Tensor) -> None:
        dec = self.decoder
        A, S, _ = memory.shape
        allowed = torch.arange(S, device=memory.device)[None] < memory_lens.to(memory.device)[:, None]
        # OWSM pads every input to 30 s, so usually no frame is padding and attention needs no mask.
        cache.memory_allowed = None if bool(allowed.all()) else allowed
        D, L = memory.shape[2], len(dec.decoders)
        self.macs = 2 * A * S * D * D * L  # src-attention keys and values, once per utterance
        for layer in dec.decoders:
            src = layer.src_attn
            keys = src.k_norm(heads(src, src.linear_k, memory)).transpose(1, 2).contiguous()
            cache.src.append((keys, heads(src, src.linear_v, memory).transpose(1, 2).contiguous()))
        if self.gated:
            cfg = self.config
            if cfg.predictor == "local" and dec.forced_keep is None:
                context, pad = dec._context(memory, allowed[:, None, :])
                cache.gate_context = [gate.project_context(context, pad) for gate in dec.pruning.gates]
                self.macs += 3 * context[:, :, :, 0].numel() * D * D * L
            if cfg.decoder == "utterance":
                cache.utterance_keep = torch.zeros(A, len(dec.decoders), len(MODULES), dtype=torch.bool,
                                                   device=memory.device)
            if cfg.predictor == "global" and dec.forced_keep is None:
                logits = dec.global_source.decoder_logits
                if logits is None or logits.shape[0] != A:
                    raise ValueError("decode: globalGP's decoder decisions come from the encoder's forward pass "
                                     "on the same utterances; run the encoder first")
                cache.utterance_keep = self._decide(logits.unflatten(1, (len(dec.decoders), len(MODULES))))

    def _decide(self, logits: Tensor) -> Tensor:
        """Keep decisions (bool) from gate logits (..., 2): the threshold the gated decoder uses."""
        return gate_mask(logits, training=False, threshold=self.config.threshold).bool()

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self, cache: DecoderCache, tokens: Tensor, logits: bool = True) -> Tensor | None:
        """Feeds tokens (rows,) at the next position; returns the log-probabilities of the token
        after it (rows, V) in float32, or None with logits=False (primer tokens)."""
        dec = self.decoder
        if tokens.shape != (cache.rows,):
            raise ValueError(f"step: tokens must be ({cache.rows},), got {tuple(tokens.shape)}")
        position = cache.length
        embedding, positional = dec.embed[0], dec.embed[1]
        if position >= positional.pe.shape[1]:
            positional.extend_pe(embedding.weight.new_empty(1, 2 * position))
        x = embedding(tokens) * positional.xscale + positional.pe[0, position]
        slots = cache.new_slots()
        forced = None
        if self.gated and dec.forced_keep is not None:  # benchmarks: every layer's random masks in one draw
            with profiled("gate"):
                shape = (cache.rows, len(dec.decoders), len(MODULES))
                forced = self._decide(random_keep_logits(shape, dec.forced_keep, dec.forced_generator, x.device))
        layer_keeps = []
        for index, layer in enumerate(dec.decoders):
            with profiled("gate"):
                keep, x = self._layer_keep(index, x, cache, position, forced)
            layer_keeps.append(keep)
            x = self._layer(index, layer, x, cache, slots, keep)
        if self.gated:
            cache.keep_slab[slots] = torch.stack(layer_keeps, dim=1)
        if not logits:
            return None
        self.macs += dec.output_layer.weight.numel() * x.shape[0]
        with profiled("output"):
            return torch.log_softmax(self._output_layer(dec.after_norm(x)).float(), dim=-1)

    def _output_layer(self, x: Tensor) -> Tensor:
        """The output layer. On CPU through a (D, V) copy of its weight: MKL multiplies faster with
        the weight in that layout (base, 50k vocabulary: 22.3 -> 18.9 ms at 40 rows, 14.3 -> 10.0 ms
        at 5 rows), and this layer is a third of a decode step. The copy is renewed whenever the
        weight changes (training, loading)."""
        layer = self.decoder.output_layer
        weight = layer.weight
        if weight.device.type != "cpu":
            return layer(x)
        version = (weight.data_ptr(), weight._version, weight.dtype)
        if self._output_weight_t is None or self._output_weight_t[0] != version:
            self._output_weight_t = (version, weight.detach().t().contiguous())
        weight_t = self._output_weight_t[1]
        return x @ weight_t if layer.bias is None else torch.addmm(layer.bias, x, weight_t)

    def _layer_keep(self, index: int, x: Tensor, cache: DecoderCache, position: int, forced: Tensor | None):
        """(rows, modules) bool decisions of this layer (None: ungated), and x after the predictor.
        forced: (rows, layers, modules) random masks of the benchmarks, instead of the gates."""
        if not self.gated:
            return None, x
        dec, cfg = self.decoder, self.config
        if forced is not None:
            return forced[:, index], x
        if cfg.predictor == "local":
            gate = dec.pruning.gates[index]
            logits, x = gate.step(x, cache.gate_context[index], cache.rows_per_utterance)
            keys = cache.gate_context[index][0]
            self.macs += x.shape[0] * (3 * x.shape[1] ** 2 + 2 * keys.shape[2] * x.shape[1]
                                       + gate.to_logits.weight.numel())
            if cfg.decoder == "token":
                return self._decide(logits), x
            if position == 0:  # utterance-wise: the first prompt token decides for the whole output
                cache.utterance_keep[:, index] = self._decide(logits)
        return cache.utterance_keep[:, index], x

    def _row_sets(self, keep: Tensor, rows_per_utterance: int) -> list[RowSet | None]:
        """For each module, the rows that keep it (None: every row), from one grouping of the rows
        by their masks, one transfer to the host and one index tensor back."""
        n, M = keep.shape
        grouping = ops.group_rows(keep)
        groups = grouping.offsets.numel() - 1
        host = torch.cat([grouping.offsets, grouping.perm, keep.flatten().long()]).tolist()
        offsets, perm, flags = host[: groups + 1], host[groups + 1 : groups + 1 + n], host[groups + 1 + n :]
        members = [perm[offsets[g] : offsets[g + 1]] for g in range(groups)]
        kept = [sorted(r for g in range(groups) if flags[members[g][0] * M + m] for r in members[g])
                for m in range(M)]
        partial = [rows for rows in kept if len(rows) < n]
        indices = iter(torch.tensor([r for rows in partial for r in rows], dtype=torch.long)
                       .to(keep.device).split([len(rows) for rows in partial]))
        sets = []
        for rows in kept:
            if len(rows) == n:
                sets.append(None)
                continue
            counts = [0] * (n // rows_per_utterance)
            for r in rows:
                counts[r // rows_per_utterance] += 1
            sets.append(RowSet(next(indices), counts))
        return sets

    def _layer(self, index, layer, x, cache: DecoderCache, slots: Tensor, keep: Tensor | None) -> Tensor:
        kv = cache.kv[index]
        with profiled("self_attn"):  # every row's keys/values are written, kept or not: later tokens attend to them
            h = layer.norm1(x)
            attn = layer.self_attn
            kv[slots, 0] = attn.k_norm(heads(attn, attn.linear_k, h))
            kv[slots, 1] = heads(attn, attn.linear_v, h)
        n, D = x.shape
        # multiply-accumulates per row of each module, and of the keys/values written for all rows
        per_row = (2 * D * D + 2 * cache.length * D, 2 * D * D + 2 * cache.src[index][0].shape[2] * D,
                   2 * layer.feed_forward.w_1.weight.numel())
        self.macs += n * 2 * D * D
        if keep is None or self.execution == "masked":  # dense, or the papers' masked execution
            for m, module in enumerate(MODULES):
                with profiled(module):
                    y = self.branch(module, index, x, h, cache, None)
                with profiled("scatter"):
                    x = x + (y if keep is None else y * keep[:, m, None].to(x.dtype))
                self.macs += n * per_row[m]
            return x
        with profiled("compaction"):
            row_sets = self._row_sets(keep, cache.rows_per_utterance)
        for m, (module, rows) in enumerate(zip(MODULES, row_sets, strict=True)):
            if rows is not None and not rows.index.numel():
                continue  # no row keeps it: its weights are not touched
            with profiled(module):
                y = self.branch(module, index, x, h, cache, rows)
            with profiled("scatter"):
                x = x + y if rows is None else x.index_add(0, rows.index, y)
            self.macs += (n if rows is None else rows.index.numel()) * per_row[m]
        return x

    def branch(self, module: str, index: int, x: Tensor, h: Tensor, cache: DecoderCache,
               rows: RowSet | None) -> Tensor:
        """The residual branch of one gated module of layer `index` for `rows` (None: every row).
        x: the layer's input for every row; h: norm1(x), whose keys/values are in the cache."""
        if module == "self_attn":
            return self._self_attention(index, h, cache, rows)
        if module == "src_attn":
            return self._src_attention(index, x, cache, rows)
        return self._feed_forward(index, x, rows)

    def _self_attention(self, index: int, h: Tensor, cache: DecoderCache, rows: RowSet | None) -> Tensor:
        layer = self.decoder.decoders[index]
        attn, kv = layer.self_attn, cache.kv[index]
        h_rows = _select(h, rows)
        ancestry = _select(cache.ancestry, rows)
        prefix = kv.index_select(0, ancestry.flatten()).view(*ancestry.shape, *kv.shape[1:])  # (n, L, 2, H, Dh)
        q = attn.q_norm(heads(attn, attn.linear_q, h_rows))[:, :, None]  # (n, H, 1, Dh)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, prefix[:, :, 0].transpose(1, 2), prefix[:, :, 1].transpose(1, 2), scale=1 / math.sqrt(attn.d_k))
        return layer.dropout(attn.linear_out(out.flatten(1)))

    def _src_attention(self, index: int, x: Tensor, cache: DecoderCache, rows: RowSet | None) -> Tensor:
        layer = self.decoder.decoders[index]
        src = layer.src_attn
        q = src.q_norm(heads(src, src.linear_q, layer.norm2(_select(x, rows))))
        keys, values = cache.src[index]
        counts = cache.rows_per_utterance if rows is None else rows.counts
        out = memory_attention(q, keys, values, cache.memory_allowed, counts)
        return layer.dropout(src.linear_out(out.flatten(1)))

    def _feed_forward(self, index: int, x: Tensor, rows: RowSet | None) -> Tensor:
        layer = self.decoder.decoders[index]
        return layer.dropout(layer.feed_forward(layer.norm3(_select(x, rows))))


def _select(x: Tensor, rows: RowSet | None) -> Tensor:
    return x if rows is None else x.index_select(0, rows.index)


def timestamp_ids(token_list: list[str]) -> list[int]:
    """OWSM's timestamp tokens <0.00> ... <30.00>."""
    return [i for i, t in enumerate(token_list) if re.fullmatch(r"<\d+\.\d\d>", t)]


class CTCPrefixScores:
    """ESPnet's vectorised CTC prefix scorer (CTCPrefixScoreTH) for utterances x hypotheses, with
    the state selection its batch beam search does (CTCPrefixScorer.select_state), vectorised."""

    def __init__(self, ctc, memory: Tensor, memory_lens: Tensor, eos: int):
        self.logp, self.lens, self.eos = ctc.log_softmax(memory), memory_lens, eos
        self._new_impl()
        self.state = None
        self.full = None

    def _new_impl(self):
        from espnet.nets.ctc_prefix_score import CTCPrefixScoreTH

        self.impl = CTCPrefixScoreTH(self.logp.clone(), self.lens, 0, self.eos)  # it pads its input in place

    def __call__(self, yseq: list[list[int]], ids: Tensor) -> Tensor:
        scores, self.full = self.impl(yseq, self.state, ids)
        return scores

    def select(self, rows: Tensor, tokens: Tensor) -> None:
        r, log_psi, f_min, f_max, idmap = self.full
        self.state = (r[:, :, rows, idmap[rows, tokens]],
                      log_psi[rows, tokens][:, None].expand(-1, log_psi.shape[1]), f_min, f_max)

    def keep(self, rows: Tensor, utterances: list[int]) -> None:
        """Only these rows (of the selected state) and utterances go on."""
        if len(utterances) != self.logp.shape[0]:
            index = torch.tensor(utterances, device=self.logp.device)
            self.logp, self.lens = self.logp.index_select(0, index), self.lens.index_select(0, index.to(self.lens.device))
            self._new_impl()
        r, s, f_min, f_max = self.state
        self.state = (r[:, :, rows], s[rows], f_min, f_max)


class BatchBeamSearch:
    """ESPnet's beam search over many utterances at once. `model`: an ESPnetS2TModel (plain or
    gated) providing decoder, ctc, sos, eos and token_list."""

    def __init__(self, model, options: DecodeOptions = DecodeOptions()):
        self.options = options
        self.decoder = IncrementalDecoder(model.decoder, options.execution)
        self.ctc = model.ctc if options.ctc_weight > 0 else None
        self.sos, self.eos, self.vocab = model.sos, model.eos, model.vocab_size
        token_list = list(model.token_list)
        self.suppressed = torch.tensor(timestamp_ids(token_list), dtype=torch.long)
        self.notimestamps = token_list.index("<notimestamps>") if "<notimestamps>" in token_list else None
        self.kept_share: float | None = None

    def _limits(self, frames: int) -> tuple[int, int]:
        o = self.options
        if o.fixed_length is not None:
            return o.fixed_length, 0
        if o.maxlenratio == 0:
            maxlen = frames
        elif o.maxlenratio < 0:
            maxlen = -int(o.maxlenratio)
        else:
            maxlen = max(1, int(o.maxlenratio * frames))
        minlen = -int(o.minlenratio) if o.minlenratio < 0 else int(o.minlenratio * frames)
        return maxlen, minlen

    def _weighted_scores(self, logp: Tensor, score: Tensor, yseq: list[list[int]], ctc) -> Tensor:
        """ESPnet's weighted sum for every next token of every row (rows, V), running score included."""
        o = self.options
        weighted = logp * (1 - o.ctc_weight) if ctc is not None else logp
        if self.suppressed.numel():  # OWSM's score filter without timestamps
            weighted.index_fill_(1, self.suppressed, -math.inf)
        if o.penalty:
            weighted += o.penalty
        if o.fixed_length is not None:
            weighted[:, self.eos] = -math.inf
        if ctc is not None:  # CTC scores only the best pre-beam tokens of each row
            pre_beam = int(o.pre_beam_ratio * o.beam_size)
            ids = torch.topk(weighted, pre_beam, dim=-1)[1] if pre_beam < self.vocab else None
            weighted = weighted + o.ctc_weight * ctc(yseq, ids)
        return weighted + score[:, None]

    def _top_k(self, weighted: Tensor, utterances: int, rows_per_utterance: int):
        """The beam's best (parent row, token) of each utterance over all its rows: parents,
        tokens and scores (utterances * beam,)."""
        K, V = self.options.beam_size, self.vocab
        top_scores, top_ids = weighted.view(utterances, rows_per_utterance * V).topk(K, dim=-1)
        base = (torch.arange(utterances, device=weighted.device) * rows_per_utterance)[:, None]
        return (top_ids // V + base).flatten(), (top_ids % V).flatten(), top_scores.flatten()

    def _end_hypotheses(self, step, yseq, score, host_parents, active, limits, ended, cache, primer_length):
        """ESPnet's post-processing: <eos> appended at the length limit, hypotheses ending in
        <eos> moved to `ended` (their score set to -inf, so they are never extended), end
        detection. Returns the indices (into `active`) of the utterances that go on."""
        from espnet.nets.e2e_asr_common import end_detect

        o, K = self.options, self.options.beam_size
        host_scores = score.tolist()
        dead, going_on = set(), []
        for u, a in enumerate(active):
            maxlen, minlen = limits[a]
            for r in range(u * K, (u + 1) * K):
                if step == maxlen - 1:  # the length limit: every hypothesis ends here
                    yseq[r].append(self.eos)
                if yseq[r][-1] != self.eos:
                    continue
                dead.add(r)
                if step >= minlen and math.isfinite(host_scores[r]):
                    ended[a].append(Hypothesis(yseq[r], host_scores[r], primer_length,
                                               slots=cache.ancestry[host_parents[r]]))
            finished = step == maxlen - 1 or all(r in dead for r in range(u * K, (u + 1) * K))
            if not finished and o.maxlenratio == 0 and o.fixed_length is None:
                finished = end_detect([{"yseq": h.yseq, "score": h.score} for h in ended[a]], step)
            if not finished:
                going_on.append(u)
        if dead:
            score[torch.tensor(sorted(dead), device=score.device)] = -math.inf
        return going_on

    @torch.no_grad()
    def __call__(self, memory: Tensor, memory_lens: Tensor, primers: Tensor) -> list[list[Hypothesis]]:
        """memory (A, S, D) encoder output, memory_lens (A,), primers (A, P) int64 prompts
        (<sos> <lang> <task> <notimestamps>). Returns each utterance's n-best, best first."""
        o, K = self.options, self.options.beam_size
        A = memory.shape[0]
        if memory.dim() != 3 or memory_lens.shape != (A,):
            raise ValueError(f"decode: memory must be (A, S, D) with memory_lens (A,), got {tuple(memory.shape)} "
                             f"and {tuple(memory_lens.shape)}")
        if primers.dim() != 2 or primers.shape[0] != A or primers.shape[1] < 1:
            raise ValueError(f"decode: primers must be ({A}, P>=1) token ids, got {tuple(primers.shape)}")
        primer_list = primers.tolist()
        if any(p[0] != self.sos for p in primer_list):
            raise ValueError(f"decode: every primer must start with <sos> ({self.sos})")
        if self.suppressed.numel() and any(self.notimestamps not in p for p in primer_list):
            raise ValueError("decode: timestamp prediction is not supported; the primers must contain <notimestamps>")
        device = memory.device
        primers, self.suppressed = primers.to(device), self.suppressed.to(device)  # once, not every step
        limits = [self._limits(int(n)) for n in memory_lens.tolist()]
        cache = self.decoder.start(memory, memory_lens)
        ctc = CTCPrefixScores(self.ctc, memory, memory_lens.to(device), self.eos) if self.ctc is not None else None
        P = primers.shape[1]
        for p in range(P - 1):
            self.decoder.step(cache, primers[:, p], logits=False)
        tokens, yseq = primers[:, -1], [list(p) for p in primer_list]
        score = torch.zeros(A, device=device)
        active = list(range(A))  # original index of each utterance still decoding
        ended: list[list[Hypothesis]] = [[] for _ in range(A)]
        step = 0
        while active:
            logp = self.decoder.step(cache, tokens)
            with profiled("beam"):  # scores, top-k, hypotheses, <eos>, limits
                weighted = self._weighted_scores(logp, score, yseq, ctc)
                parents, new_tokens, score = self._top_k(weighted, len(active), cache.rows_per_utterance)
                host_parents, host_tokens = torch.stack([parents, new_tokens]).tolist()
                if ctc is not None:
                    ctc.select(parents, new_tokens)
                yseq = [yseq[p] + [t] for p, t in zip(host_parents, host_tokens, strict=True)]
                going_on = self._end_hypotheses(step, yseq, score, host_parents, active, limits, ended, cache, P)
                step += 1
                if not going_on:
                    break
                keep_rows = [r for u in going_on for r in range(u * K, (u + 1) * K)]
                rows = torch.tensor(keep_rows, device=device)
                cache.reorder(parents.index_select(0, rows), going_on)
                if ctc is not None:
                    ctc.keep(rows, going_on)
                tokens, score = new_tokens.index_select(0, rows), score.index_select(0, rows)
                yseq = [yseq[r] for r in keep_rows]
                active = [active[u] for u in going_on]
        # share of (token, layer, module) units kept over the whole decode
        self.kept_share = float(cache.keep_slab[: cache.used].float().mean()) if self.decoder.gated else None
        results = []
        for a, hyps in enumerate(ended):
            best = sorted(hyps, key=lambda h: h.score, reverse=True)[: o.nbest]
            if not best:
                log.warning("decode: utterance %d ended no hypothesis (minlenratio too large?)", a)
            for h in best:
                if self.decoder.gated:
                    h.keep = cache.keep_slab.index_select(0, h.slots).cpu()
                h.slots = None
            results.append(best)
        return results
