"""The OWSM v3.1 backbone (ESPnet's S2T model) in one home: `encoder.py`, `decoder.py` (ESPnet's
E-Branchformer encoder and Transformer decoder gated in place), `weights.py` (presets with random
weights, snapshots in a real OWSM checkpoint's layout), `tokenizer.py` (BPE and OWSM's special
tokens), `backbone.py` (what training, decoding and evaluation need: `OwsmBackbone`), `bench.py`,
`bench_decoder.py` (`localgp bench --backbone owsm`). Importing the package imports none of them."""
