"""The method's model side, backbone-free: gate configs (config.py), modules run under gates
(gating.py), what every gated encoder and decoder hosts (pruning.py), attention on packed rows
(attention.py), the incremental decoder's view of a decoder (layout.py), the switches on a gated
model (convert.py), packed CPU linears (packed.py). The backbones' adapters live in
localgp/backbones/<home>/."""
