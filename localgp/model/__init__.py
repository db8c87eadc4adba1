"""OWSM v3.1 through ESPnet's own classes, and its gated (prunable) form."""
