"""The drill's note of how a killed service went: how long its process took to disappear, and
what its threads were doing while it lingered."""

import subprocess
import sys
import time

import pytest

from services.chaos.scenarios import LINGERING_S, _watch_exit

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_a_lingering_process_has_its_threads_noted_and_its_exit_timed():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        seen = {"killed_pid": proc.pid, "killed_at": time.monotonic()}
        _watch_exit(seen)
        assert "exit_s" not in seen and "lingering" not in seen  # there, but not for long yet

        seen["killed_at"] -= LINGERING_S + 1
        _watch_exit(seen)
        threads = seen["lingering"]["threads"]
        assert seen["lingering"]["after_s"] > LINGERING_S
        assert threads and all({"name", "state", "wchan"} <= set(t) for t in threads)
        assert threads[0]["name"].startswith("python")
    finally:
        proc.kill()
        proc.wait()
    _watch_exit(seen)
    assert seen["exit_s"] > LINGERING_S
    noted = dict(seen)
    _watch_exit(seen)  # noted once
    assert seen == noted
