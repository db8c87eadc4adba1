"""The incremental decoder: a backbone's decoder (plain or gated) one token per row and step,
for B utterances x K hypotheses as rows, with caches.

- Self-attention keys/values are written once per token into a slot buffer and each row reads
  its prefix through its ancestry (slot ids), so beam selection never copies the cache. The
  memory is projected to src-attention keys/values once per utterance (ESPnet re-projects it
  for every hypothesis at every step).
- With gates, each layer reads its (rows, modules) decisions to the host once; a module runs only on
  the rows that keep it and its weights are not touched when no row does. A row that skips
  self-attention still writes its keys/values, so later tokens see what they see in the masked
  reference (the gated decoder's full-prefix forward).

The backbone is seen through its adapter's `DecoderView` (localgp.model.layout), which the caller
passes in (OWSM's `espnet_decoder_view`, openai-whisper's `whisper_decoder_view`): this module
knows no backbone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from localgp import ops
from localgp.gates import gate_mask, random_keep_logits
from localgp.model import packed
from localgp.model.attention import memory_attention
from localgp.model.config import EXECUTIONS
from localgp.model.gating import device_rows, profiled
from localgp.model.layout import DecoderView

MODULES = ("self_attn", "src_attn", "ffn")  # the gated modules of a decoder layer, in order
# On a GPU a decode step of this many rows or fewer is bound by reading the weights: selecting the
# rows that keep a module saves nothing, skipping it for all of them saves its weight reads.
# (A guess from the H100's balance point, not yet measured here: no GPU has run the decoder.)
WHOLE_MODULE_ROWS = 64


class RowSet(NamedTuple):
    """The rows a module runs on: their index (ascending, so grouped by utterance) and how many
    of them each utterance has."""

    index: Tensor
    counts: list[int]


MASKED = RowSet(None, [])  # a module run on every row, its output multiplied by the rows' masks


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
    """A decoder (ESPnet's TransformerDecoder or Whisper's TextDecoder, plain or gated by localgp)
    one token per row and step; `view` is its adapter's DecoderView of it."""

    def __init__(self, decoder, view: DecoderView, execution: str = "compact"):
        if execution not in EXECUTIONS:
            raise ValueError(f"IncrementalDecoder: execution must be one of {EXECUTIONS}, got {execution!r}")
        if not isinstance(view, DecoderView):
            raise TypeError(f"IncrementalDecoder: view must be the decoder's DecoderView (its adapter's "
                            f"espnet_decoder_view / whisper_decoder_view), got {type(view).__name__}")
        self.view = view
        self.decoder, self.execution = decoder, execution
        self.macs = 0  # multiply-accumulates executed since the last start() (benchmarks)
        self.gated = hasattr(decoder, "pruning")  # gate_decoder() refuses an ungated config
        self.config = decoder.pruning.config if self.gated else None
        precision = packed.precision_of(decoder)  # see _output_layer
        self.packed_output = None if precision is None else packed.PackedWeight(precision)

    # ------------------------------------------------------------------ set-up
    def start(self, memory: Tensor, memory_lens: Tensor) -> DecoderCache:
        """memory (A, S, D) encoder output; memory_lens (A,). One row per utterance to begin with."""
        attn = self.view.layers[0].self_attn
        cache = DecoderCache(len(self.view.layers), memory.shape[0], attn.heads, attn.head_dim, len(MODULES), memory)
        with profiled("memory_kv"):
            self._project_memory(cache, memory, memory_lens)
        return cache

    def _project_memory(self, cache: DecoderCache, memory: Tensor, memory_lens: Tensor) -> None:
        dec = self.decoder
        A, S, _ = memory.shape
        allowed = torch.arange(S, device=memory.device)[None] < memory_lens.to(memory.device)[:, None]
        # OWSM pads every input to 30 s, so usually no frame is padding and attention needs no mask.
        cache.memory_allowed = None if bool(allowed.all()) else allowed
        D, L = memory.shape[2], len(self.view.layers)
        self.macs = 2 * A * S * D * D * L  # src-attention keys and values, once per utterance
        for layer in self.view.layers:
            src = layer.src_attn
            cache.src.append((src.key(memory).transpose(1, 2).contiguous(),
                              src.value(memory).transpose(1, 2).contiguous()))
        if self.gated:
            cfg = self.config
            if cfg.predictor == "local" and dec.forced_keep is None:
                context, pad = dec.gate_context(memory, allowed)
                cache.gate_context = [gate.project_context(context, pad) for gate in dec.pruning.gates]
                self.macs += 3 * context[:, :, :, 0].numel() * D * D * L
            if cfg.decoder == "utterance":
                cache.utterance_keep = torch.zeros(A, L, len(MODULES), dtype=torch.bool, device=memory.device)
            if cfg.predictor == "global" and dec.forced_keep is None:
                logits = dec.global_source.decoder_logits
                if logits is None or logits.shape[0] != A:
                    raise ValueError("decode: globalGP's decoder decisions come from the encoder's forward pass "
                                     "on the same utterances; run the encoder first")
                cache.utterance_keep = self._decide(logits.unflatten(1, (L, len(MODULES))))

    def _decide(self, logits: Tensor) -> Tensor:
        """Keep decisions (bool) from gate logits (..., 2): the threshold the gated decoder uses."""
        return gate_mask(logits, training=False, threshold=self.config.threshold).bool()

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self, cache: DecoderCache, tokens: Tensor, logits: bool = True, normalize: bool = True) -> Tensor | None:
        """Feeds tokens (rows,) at the next position; returns the log-probabilities of the token
        after it (rows, V) in float32 (normalize=False: the logits, for searches that filter them
        first), or None with logits=False (primer tokens)."""
        dec, view = self.decoder, self.view
        if tokens.shape != (cache.rows,):
            raise ValueError(f"step: tokens must be ({cache.rows},), got {tuple(tokens.shape)}")
        position = cache.length
        if view.max_positions is not None and position >= view.max_positions:
            raise ValueError(f"step: the decoder has {view.max_positions} positions; position {position} is beyond them")
        x = view.embed(tokens, position).to(cache.kv[0].dtype)
        slots = cache.new_slots()
        forced = None
        if self.gated and dec.forced_keep is not None:  # benchmarks: every layer's random masks in one draw
            with profiled("gate"):
                shape = (cache.rows, len(view.layers), len(MODULES))
                forced = self._decide(random_keep_logits(shape, dec.forced_keep, dec.forced_generator, x.device))
        layer_keeps = []
        for index, layer in enumerate(view.layers):
            with profiled("gate"):
                keep, x = self._layer_keep(index, x, cache, position, forced)
            layer_keeps.append(keep)
            x = self._layer(index, layer, x, cache, slots, keep)
        if self.gated:
            cache.keep_slab[slots] = torch.stack(layer_keeps, dim=1)
        if not logits:
            return None
        self.macs += view.output_weight.numel() * x.shape[0]
        with profiled("output"):
            out = self._output_layer(view.final_norm(x)).float()
            return torch.log_softmax(out, dim=-1) if normalize else out

    def _output_layer(self, x: Tensor) -> Tensor:
        """The output layer, a third of a decode step on the CPU: through oneDNN's packed weight
        when the decoder's linears are packed, at their precision (`pack_linears`: base's 50k
        vocabulary at 30 rows, 26 -> 9.4 ms in float32), else as the model computes it."""
        weight, bias = self.view.output_weight, self.view.output_bias
        if self.packed_output is not None and packed.applies(x, weight, self.packed_output.precision):
            return packed.linear(x, weight, bias, self.packed_output)
        return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

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
        """For each module, the rows that keep it (None: every row), from one transfer of the
        layer's decisions to the host and one index tensor back. Rows that share a mask end up in
        the same row sets: each module runs once on all the rows that keep it."""
        n, M = keep.shape
        ops.count_host_reads()
        flags = keep.t().tolist()  # the one host read of the layer and step
        kept = [[r for r in range(n) if flags[m][r]] for m in range(M)]
        if self.whole_modules(keep):
            # Few rows on a GPU: reading the weights is the cost, so a module runs on every row
            # (its output masked) unless no row keeps it.
            return [RowSet(keep.new_empty(0, dtype=torch.long), []) if not rows else
                    None if len(rows) == n else MASKED for rows in kept]
        partial = [rows for rows in kept if len(rows) < n]
        indices = iter(device_rows([r for rows in partial for r in rows], keep.device)
                       .split([len(rows) for rows in partial]))
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

    def whole_modules(self, keep: Tensor) -> bool:
        """Whether modules run on all rows or none (GPU, at most WHOLE_MODULE_ROWS rows)."""
        return keep.is_cuda and keep.shape[0] <= WHOLE_MODULE_ROWS

    def _layer(self, index, layer, x, cache: DecoderCache, slots: Tensor, keep: Tensor | None) -> Tensor:
        kv = cache.kv[index]
        with profiled("self_attn"):  # every row's keys/values are written, kept or not: later tokens attend to them
            h = layer.self_norm(x)
            kv[slots, 0] = layer.self_attn.key(h)
            kv[slots, 1] = layer.self_attn.value(h)
        n, D = x.shape
        # multiply-accumulates per row of each module, and of the keys/values written for all rows
        per_row = (2 * D * D + 2 * cache.length * D, 2 * D * D + 2 * cache.src[index][0].shape[2] * D, layer.ffn_macs)
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
            if rows is not None and rows is not MASKED and not rows.index.numel():
                continue  # no row keeps it: its weights are not touched
            if rows is MASKED:
                with profiled(module):
                    y = self.branch(module, index, x, h, cache, None)
                with profiled("scatter"):
                    x = x + y * keep[:, m, None].to(x.dtype)
                self.macs += n * per_row[m]
                continue
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
        layer = self.view.layers[index]
        attn, kv = layer.self_attn, cache.kv[index]
        h_rows = _select(h, rows)
        ancestry = _select(cache.ancestry, rows)
        prefix = kv.index_select(0, ancestry.flatten()).view(*ancestry.shape, *kv.shape[1:])  # (n, L, 2, H, Dh)
        q = attn.query(h_rows)[:, :, None]  # (n, H, 1, Dh)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, prefix[:, :, 0].transpose(1, 2), prefix[:, :, 1].transpose(1, 2), scale=attn.scale)
        return layer.dropout(attn.out(out[:, :, 0]))

    def _src_attention(self, index: int, x: Tensor, cache: DecoderCache, rows: RowSet | None) -> Tensor:
        layer = self.view.layers[index]
        q = layer.src_attn.query(layer.src_norm(_select(x, rows)))
        keys, values = cache.src[index]
        counts = cache.rows_per_utterance if rows is None else rows.counts
        out = memory_attention(q, keys, values, cache.memory_allowed, counts)
        return layer.dropout(layer.src_attn.out(out))

    def _feed_forward(self, index: int, x: Tensor, rows: RowSet | None) -> Tensor:
        return self.view.layers[index].ffn(_select(x, rows))


def _select(x: Tensor, rows: RowSet | None) -> Tensor:
    return x if rows is None else x.index_select(0, rows.index)


