"""Speech data: audio decoding and corpus loaders (Europarl-ST v1.1, ESPnet/Kaldi data dirs)."""
