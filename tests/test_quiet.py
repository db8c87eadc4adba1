"""Clean terminal output: ESPnet's imports print nothing of g2p_en's nltk downloads or its
flash-attention notice, other output still shows; the Whisper path imports no ESPnet at all."""

import subprocess
import sys


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_espnet_s2t_import_is_quiet():
    done = run("from localgp.quiet import espnet_imports\n"
               "with espnet_imports():\n"
               "    import espnet2.tasks.s2t\n"
               "    print('kept')\n"
               "import nltk\n"
               "assert nltk.download.__name__ == 'download'  # restored\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "kept\n" and done.stderr == "", (done.stdout, done.stderr)


def test_whisper_path_imports_no_espnet():
    done = run("import sys\n"
               "from whisper.model import ModelDimensions, Whisper\n"
               "import localgp.cli, localgp.longform, localgp.backbones.whisper.backbone, localgp.model.convert, localgp.runs\n"
               "import localgp.backbones.whisper.decoding\n"
               "from localgp.backbones.whisper.model import gate_whisper, whisper_decoder_view\n"
               "from localgp.decoding.incremental import IncrementalDecoder\n"
               "from localgp.model.config import GateConfig\n"
               "dims = ModelDimensions(80, 16, 16, 2, 1, 51865, 8, 16, 2, 1)\n"
               "model = gate_whisper(Whisper(dims), GateConfig(encoder='temporal', decoder='token'))\n"
               "IncrementalDecoder(model.decoder, whisper_decoder_view(model.decoder))\n"
               "print(sorted(m for m in sys.modules if m.split('.')[0] in ('espnet', 'espnet2', 'g2p_en', 'nltk')))\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n" and "Flash" not in done.stderr, (done.stdout, done.stderr)
