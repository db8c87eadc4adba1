"""Gating a model localgp does not ship: a small pre-norm Transformer encoder of your own, with
localgp's public API. Convert it in place, train one masked step with the sparsity loss, run it
compact, profile it. `python examples/gate_your_own_model.py [--out DIR]` (README: "Your own model")."""

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

from localgp.bench import Case
from localgp.gates import GateRecord
from localgp.model.attention import Projections
from localgp.model.config import GateConfig
from localgp.model.convert import pruning_loss, set_execution
from localgp.model.gating import PositionGate
from localgp.model.pruning import EncoderPruning, GatedEncoderMixin, init_encoder_gating
from localgp.profile import profile_case


class Block(nn.Module):  # your model: x + attn(norm1(x)), then x + ff(norm2(x))
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2, self.ff = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))


class Encoder(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4, layers: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(Block(d, heads) for _ in range(layers))


# ---- what localgp needs: the attention's projections, and a forward that runs each block under its gates
class MHA(Projections):
    def __init__(self, attn: nn.MultiheadAttention):
        self.attn, self.heads, self.head_dim = attn, attn.num_heads, attn.head_dim
        self.wq, self.wk, self.wv = attn.in_proj_weight.chunk(3)
        self.bq, self.bk, self.bv = attn.in_proj_bias.chunk(3)

    def query(self, x): return self.split(nn.functional.linear(x, self.wq, self.bq))  # noqa: E704
    def key(self, x): return self.split(nn.functional.linear(x, self.wk, self.bk))  # noqa: E704
    def value(self, x): return self.split(nn.functional.linear(x, self.wv, self.bv))  # noqa: E704
    def out(self, o): return self.attn.out_proj(o.flatten(-2))  # noqa: E704


class GatedEncoder(GatedEncoderMixin, Encoder):
    gated_layers = property(lambda self: self.layers)

    def forward(self, x, lengths):  # x (B, T, D), lengths (B,): attention and MLP gated per frame
        valid = torch.arange(x.shape[1])[None] < lengths[:, None]
        context, record = self.start_gates(x, valid), GateRecord()
        for i, b in enumerate(self.layers):
            logits, x, context = self.layer_logits(i, x, context, valid)
            gate = PositionGate(logits, valid, lengths, ("attn", "ffn"), self.pruning.config, self.execution,
                                self.training, record, f"encoder.{i}")
            x = gate.self_attention("attn", x, MHA(b.attn), b.norm1, lambda h, b=b: b.attn(h, h, h)[0])
            x = gate.residual("ffn", x, lambda h, b=b: b.ff(b.norm2(h)))
        self.last_record = record
        return x


def gate(model: Encoder, config: GateConfig) -> GatedEncoder:  # convert in place: weights and keys unchanged
    model.__class__ = GatedEncoder
    d = model.layers[0].norm1.normalized_shape[0]
    init_encoder_gating(model, EncoderPruning(config, d, len(model.layers), ("attn", "ffn")))
    return model


def main(out: str) -> None:
    torch.manual_seed(0)
    model = gate(Encoder(), GateConfig(encoder="temporal", decoder=None, contexts=(("front", 0),)))
    x, lengths = torch.randn(4, 50, 64), torch.tensor([50, 40, 30, 20])
    optimizer = torch.optim.Adam([p for n, p in model.named_parameters() if "pruning." in n], lr=1e-3)
    model.train()  # one masked training step: a task loss (here: stay close to the input) + the sparsity loss
    task = (model(x, lengths) - x).pow(2).mean()
    total, sparsity = pruning_loss(model, task, target=0.5)
    total.backward()
    optimizer.step()
    set_execution(model.eval(), "compact")  # skipped frames are not computed
    with torch.no_grad():
        y = model(x, lengths)
    report = profile_case(Case(lambda: model(x, lengths), lambda: None), torch.device("cpu"), repeats=2, warmup=1,
                          trace=Path(out) / "trace.json", layers=len(model.layers))
    print(f"trained: sparsity {float(sparsity.detach()):.2f}; compact output {tuple(y.shape)}; profile (ms): "
          + ", ".join(f"{k} {v:.2f}" for k, v in report["modules_ms"].items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=tempfile.mkdtemp(prefix="localgp-example-"), help="where the trace goes")
    main(parser.parse_args().out)
