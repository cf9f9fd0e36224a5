"""`python tests/kill_after.py N <bench.py arguments>`: bench.py, SIGKILLed by itself right after it has written its
Nth in-progress checkpoint (last.pt). A real kill at a chosen point, so resume tests do not depend on timing; under
torchrun the launcher then takes the other ranks down, as it does when a node dies."""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines import train  # noqa: E402

kill_at = int(sys.argv.pop(1))
writes = 0
save = train.save_checkpoint


def save_then_maybe_die(path, payload):
    global writes
    save(path, payload)
    if Path(path).name == "last.pt":
        writes += 1
        if writes == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


train.save_checkpoint = save_then_maybe_die

from bench import cli  # noqa: E402

cli(sys.argv[1:])
