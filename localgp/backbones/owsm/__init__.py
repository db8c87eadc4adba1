"""The OWSM v3.1 backbone (ESPnet's S2T model) in one home: `encoder.py`, `decoder.py` (ESPnet's
E-Branchformer encoder and Transformer decoder gated in place; the decoder's view for the
incremental decoder), `model.py` (`gate_s2t_model`: the whole model gated), `weights.py` (presets
with random weights, snapshots in a real OWSM checkpoint's layout), `tokenizer.py` (BPE and OWSM's
special tokens), `backbone.py` (what training, decoding and evaluation need: `OwsmBackbone`),
`decoding.py` (ESPnet's beam search, `BatchBeamSearch`), `bench.py`, `bench_decoder.py` (`localgp
bench --backbone owsm`). Importing the package imports none of them."""
