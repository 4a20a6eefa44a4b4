"""Nothing outlives the pytest process that started it: the interpreted Triton suite's subprocess
(helpers.InterpretedSuite, started by conftest.py's pytest_collection_finish) is started only when
tests will run, and ends with the run on every exit path: the end of the run, a collection only,
an -x stop, Ctrl-C, an internal error, and the run's process killed outright.

Each case runs pytest in a subprocess on a small tests folder whose conftest.py takes this suite's
hooks (tests/conftest.py) and replaces the interpreted suite's pytest arguments with a test that
sleeps (or passes at once). Every process of a case carries an environment variable with a token
of its own; after the run, none may be left (Linux: /proc/<pid>/environ)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
TOKEN_VARIABLE = "FUSEDCLIP_STRAY_PROCESS_TOKEN"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")

CONFTEST = '''
import importlib.util
import os
import sys

sys.path.insert(0, {tests!r})
import helpers

# The interpreted suite's subprocess runs the child folder's test instead.
helpers.InterpretedSuite.pytest_args = classmethod(lambda cls: ["-q", "-p", "no:cacheprovider", {child!r}])

start = helpers.InterpretedSuite.start.__func__


def recorded_start(cls):
    with open(os.environ["STARTS"], "a") as f:
        f.write("start\\n")
    start(cls)


helpers.InterpretedSuite.start = classmethod(recorded_start)

spec = importlib.util.spec_from_file_location("fusedclip_tests_conftest", os.path.join({tests!r}, "conftest.py"))
suite_conftest = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite_conftest)
globals().update({{name: hook for name, hook in vars(suite_conftest).items() if name.startswith("pytest_")}})

if os.environ.get("MODE") == "internal-error":
    def pytest_runtest_logreport(report):
        raise RuntimeError("an internal error")
'''

TESTS_FILE = '''
import os
import pathlib
import time

MODE = os.environ.get("MODE", "")


def test_0_first():
    assert MODE != "fail"
    if MODE == "wait":
        pathlib.Path(os.environ["READY"]).write_text("ready")
        time.sleep(120)


def test_interpreted_suite():
    if MODE == "result":
        from helpers import InterpretedSuite

        returncode, stdout, _ = InterpretedSuite.result()
        assert returncode == 0 and "1 passed" in stdout, stdout
'''

CHILD = '''
import os
import time


def test_child():
    if os.environ.get("MODE") != "result":
        time.sleep(300)
'''


def _processes_with(token: str) -> list[int]:
    """The live processes whose environment holds the token (zombies have none)."""
    found = []
    needle = f"{TOKEN_VARIABLE}={token}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            pass
    return found


class Run:
    """A pytest run of the small folder (tmp_path/tests), in a subprocess of its own."""

    def __init__(self, tmp_path, mode: str = "", *args: str):
        (tmp_path / "tests").mkdir()
        (tmp_path / "child").mkdir()
        (tmp_path / "tests" / "conftest.py").write_text(CONFTEST.format(tests=TESTS, child=str(tmp_path / "child")))
        (tmp_path / "tests" / "test_small.py").write_text(textwrap.dedent(TESTS_FILE))
        (tmp_path / "child" / "test_child.py").write_text(textwrap.dedent(CHILD))
        self.token = uuid.uuid4().hex
        self.starts = tmp_path / "starts"
        self.ready = tmp_path / "ready"
        env = dict(os.environ, MODE=mode, STARTS=str(self.starts), READY=str(self.ready))
        env[TOKEN_VARIABLE] = self.token
        env.pop("TRITON_INTERPRET", None)
        env.pop("PYTEST_ADDOPTS", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "tests"), *args],
            cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    def wait(self, timeout: float = 120) -> str:
        output, _ = self.process.communicate(timeout=timeout)
        return output

    def wait_until_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            assert self.process.poll() is None, self.wait()
            assert time.monotonic() < deadline, "the run did not reach its waiting test"
            time.sleep(0.1)
        # the interpreted suite's subprocess runs by now (started at the end of the collection)
        assert self.starts.read_text() == "start\n"

    def started(self) -> int:
        return self.starts.read_text().count("start") if self.starts.exists() else 0

    def left_over(self, grace_s: float = 5.0) -> list[int]:
        """The processes of the run still alive once it ended (after a short grace)."""
        deadline = time.monotonic() + grace_s
        while True:
            left = _processes_with(self.token)
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)

    def kill_left_over(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in _processes_with(self.token):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def run(tmp_path):
    runs = []

    def start(mode: str = "", *args: str) -> Run:
        runs.append(Run(tmp_path, mode, *args))
        return runs[-1]

    yield start
    for started in runs:
        started.kill_left_over()


def test_collection_only_starts_nothing(run):
    r = run("", "--co")
    output = r.wait()
    assert r.process.returncode == 0, output
    assert "test_interpreted_suite" in output
    assert r.started() == 0
    assert r.left_over(grace_s=1.0) == []


def test_a_run_that_ends_stops_the_subprocess(run):
    """test_interpreted_suite passed without waiting for the subprocess: it is stopped at the end."""
    r = run()
    output = r.wait()
    assert r.process.returncode == 0, output
    assert r.started() == 1
    assert r.left_over() == []


def test_the_result_is_still_read(run):
    r = run("result")
    output = r.wait()
    assert r.process.returncode == 0, output
    assert "2 passed" in output
    assert r.left_over() == []


def test_an_x_stop_stops_the_subprocess(run):
    r = run("fail", "-x")
    output = r.wait()
    assert r.process.returncode == 1, output
    assert "1 failed" in output and "stopping after 1 failures" in output
    assert r.started() == 1
    assert r.left_over() == []


def test_an_internal_error_stops_the_subprocess(run):
    r = run("internal-error")
    output = r.wait()
    assert r.process.returncode == 3, output  # pytest's INTERNAL_ERROR
    assert "INTERNALERROR" in output and "an internal error" in output
    assert r.left_over() == []


def test_ctrl_c_stops_the_subprocess(run):
    r = run("wait")
    r.wait_until_ready()
    r.process.send_signal(signal.SIGINT)
    output = r.wait()
    assert r.process.returncode == 2, output  # pytest's INTERRUPTED
    assert "KeyboardInterrupt" in output
    assert r.left_over() == []


def test_the_subprocess_dies_with_a_killed_run(run):
    """SIGKILL leaves the run no code to run: the subprocess must end on its own when its parent
    dies (Linux: PR_SET_PDEATHSIG)."""
    r = run("wait")
    r.wait_until_ready()
    r.process.kill()
    r.wait()
    assert r.left_over() == []
