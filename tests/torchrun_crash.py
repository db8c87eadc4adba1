"""`localgp` as a torchrun worker whose rank $CRASH_RANK is killed (SIGKILL, no clean-up) once it
has written its first batch of decoded records: a process that crashes mid-way through its shard.
Used by tests/test_distributed.py."""

import os
import signal
import sys

from localgp import decode
from localgp.cli import main

if os.environ["RANK"] == os.environ["CRASH_RANK"]:
    append = decode.append_decoded

    def append_then_die(records, path):
        append(records, path)
        os.kill(os.getpid(), signal.SIGKILL)

    decode.append_decoded = append_then_die

sys.exit(main(sys.argv[1:]))
