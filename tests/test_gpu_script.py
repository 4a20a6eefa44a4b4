"""scripts/gpu.sh, the GPU job, checked without a GPU: its syntax, its dry run (every command
with its limit, the calls' time budgets, the files it writes), the machine check's stop line, and
that every test, pytest option and benchmark argument it names exists here, so that a lent GPU
measures instead of debugging the script."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu.sh")
CALLS = ("tests", "sanitizer", "bench")
# What the device machine brings back from $OUT (its README): 8 files, 2 folders down, these names.
MAX_FILES = 8
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
BUDGET_S = 300  # each call must end within 5 minutes


def gpu_sh(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=dict(os.environ, **(env or {})))


def dry_run(*calls: str, gpu_name: str = "NVIDIA H200") -> tuple[list[tuple[int, list[str], str]], list[str], str]:
    """The commands of a dry run as (limit in seconds, argv, log file), the files it says it writes,
    and its whole output."""
    result = gpu_sh("--dry-run", *calls, env={"GPU_NAME": gpu_name, "OUT": "gpu-results"})
    assert result.returncode == 0, result.stdout + result.stderr
    commands, files = [], []
    for line in result.stdout.splitlines():
        if line.startswith("[timeout "):
            limit, rest = line[len("[timeout "):].split("s] ", 1)
            argv = shlex.split(rest, comments=True)
            log = ""
            if ">>" in argv:
                log = argv[argv.index(">>") + 1]
                argv = argv[:argv.index(">>")]
            commands.append((int(limit), argv, log))
        elif line.startswith("writes: "):
            files = line[len("writes: "):].split()
    return commands, files, result.stdout


def test_syntax():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


def test_dry_run_prints_every_command_with_its_limit_and_runs_nothing(tmp_path):
    commands, files, out = dry_run(*CALLS)
    assert out.count("== gpu.sh ") == 3
    assert commands and all(limit > 0 for limit, _, _ in commands)
    # every line that is not a call's header or the file list is a command with its limit
    for line in out.splitlines():
        assert line.startswith(("[timeout ", "== gpu.sh ", "writes: ")), line
    assert not os.path.exists(os.path.join(ROOT, "gpu-results")), "a dry run must write nothing"


@pytest.mark.parametrize("call", CALLS)
def test_each_call_checks_builds_and_fits_its_budget(call):
    commands, _, out = dry_run(call)
    budget = int(re.search(r"budget (\d+) s", out).group(1))
    assert budget < BUDGET_S
    # a line per test, so that a run stopped at its limit still says what passed and failed
    assert all("-v" in argv for _, argv, _ in commands if "pytest" in argv)
    argvs = [" ".join(argv) for _, argv, _ in commands]
    assert any("nvidia-smi -L" in a for a in argvs) and any("nvcc --version" in a for a in argvs)
    assert any("ninja --version" in a for a in argvs)
    assert ("compute-sanitizer --version" in " ".join(argvs)) == (call == "sanitizer")
    build = next(argv for _, argv, _ in commands if "build_ext" in argv)
    assert {"FUSEDCLIP_CUDA=1", "TORCH_CUDA_ARCH_LIST=9.0", "MAX_JOBS=16", "--inplace"} <= set(build)
    assert all(limit <= budget for limit, _, _ in commands)  # and the script caps each at what is left


def test_the_three_calls_fit_one_command_of_a_lease():
    """The calls' budgets together fit one 600-s command (`all`: one start, one build), with
    half a minute to spare."""
    total = 0
    for call in CALLS:
        _, _, out = dry_run(call)
        total += int(re.search(r"budget (\d+) s", out).group(1))
    assert total <= 570, total


def test_files_fit_what_the_device_machine_brings_back():
    _, files, _ = dry_run(*CALLS)
    assert len(files) == len(set(files)) <= MAX_FILES
    for name in files:
        parts = name.split("/")
        assert len(parts) <= 3, name  # at most two folders down
        assert all(NAME.match(p) for p in parts), name
    stem = next(f for f in files if f.endswith(".json"))[:-len(".json")]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d-nvidia-h200", stem)
    assert {f"{stem}-gpu-tests.log", f"{stem}-sanitizer.log", f"{stem}.md", f"{stem}.png"} <= set(files)
    logs = [log for _, _, log in dry_run(*CALLS)[0] if log]  # the machine checks write none
    assert logs and all(log.startswith("gpu-results/") and log.split("/", 1)[1] in files for log in logs)


@pytest.mark.parametrize("name", ["NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"])
def test_log_names_follow_the_benchmarks_device_slug(name):
    """The logs and the benchmark's JSON/Markdown/PNG share one stem: the script's slug of the GPU
    name is the benchmark's (fusedclip.bench.harness.device_slug)."""
    from fusedclip.bench.harness import device_slug

    _, files, _ = dry_run("bench", gpu_name=name)
    assert f"-{device_slug(name)}.json" in " ".join(files)
    assert any(f.endswith(f"-{device_slug(name)}-bench.log") for f in files)


def test_unknown_argument_and_no_call_are_refused():
    assert gpu_sh("--dry-run", "bnech").returncode == 2
    assert gpu_sh("--dry-run").returncode == 2


def _pytest_commands(call: str) -> list[list[str]]:
    commands, _, _ = dry_run(call)
    out = []
    for _, argv, _ in commands:
        if "pytest" in argv:
            out.append(argv[argv.index("pytest") + 1:])
    return out


def _collected(args: list[str]) -> list[str]:
    """The node ids that pytest collects for args here (-n 0: no workers for a collection)."""
    args = [a for a in args if a != "-v"] + ["-q"]  # -q: node ids, one a line
    result = subprocess.run([sys.executable, "-m", "pytest", *args, "-n", "0", "--collect-only"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if "::" in line]


needs_plugins = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("xdist", "pytest_timeout")),
    reason="pytest-xdist and pytest-timeout (the `test` extra) are not installed",
)


@needs_plugins
def test_the_tests_call_selects_the_cuda_and_triton_tests():
    """Its pytest command lines parse here (workers, per-test timeout) and select what they say:
    the cuda-marked tests of the whole suite, and the rest of the Triton files but the
    interpreted subprocess."""
    marked, triton_rest = _pytest_commands("tests")
    assert "-x" not in triton_rest + marked and "--timeout" in marked
    cuda_ids = _collected(marked)
    assert len(cuda_ids) > 1000
    assert any("[cuda" in i for i in cuda_ids) and any("[triton" in i for i in cuda_ids)
    assert {i.split("::")[0] for i in cuda_ids} >= {"tests/test_cuda_backend.py", "tests/test_cuda_operators.py",
                                                   "tests/test_triton.py", "tests/test_compile.py"}
    rest = _collected(triton_rest)
    assert rest and all(i.startswith(("tests/test_triton.py", "tests/test_triton_operators.py")) for i in rest)
    assert not any("test_interpreted_suite" in i for i in rest)


@needs_plugins
def test_every_sanitized_test_exists():
    """Each test named for memcheck and racecheck is collected here, one for one: a renamed test
    or parameter fails here, not on the lent GPU."""
    memcheck, racecheck = _pytest_commands("sanitizer")
    for args, count in ((memcheck, (8, 12)), (racecheck, (2, 2))):
        named = [a for a in args if "::" in a]
        assert count[0] <= len(named) <= count[1]
        assert sorted(_collected(args)) == sorted(named)
    assert any("triton-" in a for a in memcheck), "one Triton kernel under memcheck"


def test_the_bench_call_parses_and_is_trimmed():
    from fusedclip.__main__ import parser

    commands, _, _ = dry_run("bench")
    argv = next(argv for _, argv, _ in commands if "bench" in argv and "fusedclip" in argv)
    args = parser().parse_args(argv[argv.index("fusedclip") + 1:])
    assert args.device == "cuda" and args.backends is None  # None: both GPU backends side by side
    assert set(args.workloads) == {"gpt2-124m", "llama-1b", "many-small", "tiny-10k", "host-1k"}
    assert set(args.training) == {"amp", "adamw"} and not args.health and args.launches
    assert args.repeats < 15 and args.output == "gpu-results"


def test_the_machine_check_stops_with_one_clear_line(tmp_path):
    """Without a GPU the check stops at the first thing missing and names it; with stand-ins for
    the tools, at the CPU torch that sees no GPU."""
    if shutil.which("nvidia-smi") is None:
        result = gpu_sh("check", env={"OUT": str(tmp_path / "a")})
        assert result.returncode == 3
        assert result.stdout.strip().splitlines()[-1].startswith("gpu.sh: STOP: nvidia-smi")
    env = {**_stand_ins(tmp_path), "PYTHON": sys.executable, "OUT": str(tmp_path / "b")}  # the real Python
    result = gpu_sh("check", env=env)
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check passes")
    last = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 3, result.stdout
    # pytest-xdist or pytest-timeout may be what is missing here; else the GPU
    assert re.match(r"gpu\.sh: STOP: (a CUDA torch that sees the GPU|the Python package \w+) is missing", last), last


def _stand_ins(tmp_path) -> dict:
    """PATH with stand-ins for the GPU tools (each prints its name), and a PYTHON that answers
    the check for a CUDA torch with yes and runs everything else in this Python."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("nvidia-smi", "nvcc", "ninja", "compute-sanitizer"):
        (fake / tool).write_text(f"#!/bin/sh\necho stand-in {tool}\n")
        (fake / tool).chmod(0o755)
    python = fake / "python"
    python.write_text("#!/bin/sh\n"
                      'case "$*" in *torch.cuda.is_available*) exit 0 ;; esac\n'
                      f'exec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    return {"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(python)}


@needs_plugins
def test_a_real_call_logs_each_command_and_keeps_to_its_budget(tmp_path):
    """The check call, run for real with stand-ins: each command's output lands in its log with
    its limit and exit status, a failing command makes the call fail without stopping it, and
    with the budget spent the rest is not started, and says so."""
    env = _stand_ins(tmp_path)
    out = tmp_path / "out"
    result = gpu_sh("check", env={**env, "OUT": str(out)})
    log = (out / "machine.log").read_text()
    assert "== [timeout 30s] nvidia-smi" in log and "stand-in nvidia-smi" in log and "== exit 0 after" in log
    # the CPU torch has no GPU to name: that command fails, the call goes on and fails at the end
    assert log.count("== exit ") == 3 and result.returncode != 0
    assert os.listdir(out) == ["machine.log"]
    spent = tmp_path / "spent"
    result = gpu_sh("check", env={**env, "OUT": str(spent), "CALL_BUDGET_S": "5"})
    assert result.returncode == 124
    assert (spent / "machine.log").read_text().count("gpu.sh: not run, the call's 5 s are spent") == 3
