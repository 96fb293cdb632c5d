"""README.md's Quickstart, run as a newcomer runs it, against the real xentd.

The commands come from README.md itself, from the `console` block between the markers
`<!-- quickstart: ... -->` and `<!-- /quickstart -->`, so changing the README changes what
runs. They run in an empty directory holding copies of `clients/` and `examples/` (so
`.venv`, `x.npy` and `out/` are made there, from nothing, as on a fresh checkout), with
XENT_ADDRESS pointing at a xentd started on a free port. One substitution is made, and only
one: `cargo run --release --bin xent --` becomes the xent binary the suite built ($XENT_BIN),
because a release build of its own would take minutes; any other `cargo` command fails the
test. Each command must exit 0, and print what the README shows under it (when it shows
anything): line for line, `...` standing for any text.

The README's Python block (between `<!-- quickstart-python: ... -->` and
`<!-- /quickstart-python -->`) then runs in the virtualenv the commands made, and every
`print(...)  # comment` line must print exactly its comment.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tests" / "support"))

import xentd_process  # noqa: E402  (tests/support: the binary as a child process)

README = REPO_ROOT / "README.md"
CARGO_XENT = "cargo run --release --bin xent --"
COMMAND_TIMEOUT_S = 600.0


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)


def between(text: str, marker: str) -> str:
    match = re.search(rf"<!-- {marker}:[^>]*-->\n(.*?)<!-- /{marker} -->", text, re.S)
    assert match, f"README.md has no <!-- {marker}: ... --> ... <!-- /{marker} --> section"
    return match.group(1)


def fenced(section: str, language: str) -> list[str]:
    match = re.search(rf"^```{language}\n(.*?)^```$", section, re.S | re.M)
    assert match, f"no ```{language} block in the README section"
    return match.group(1).splitlines()


def quickstart_steps() -> list[Step]:
    steps: list[Step] = []
    for line in fenced(between(README.read_text(), "quickstart"), "console"):
        if line.startswith("$ "):
            steps.append(Step(line[2:]))
        else:
            assert steps, f"output before the first command: {line!r}"
            steps[-1].expected.append(line)
    return steps


def runnable(command: str, xent_bin: str) -> str:
    command = command.replace(CARGO_XENT, shlex.quote(xent_bin))
    assert "cargo" not in command, f"the test can run only `{CARGO_XENT} ...` of cargo: {command}"
    return command


def matches(expected: str, line: str) -> bool:
    pattern = ".*".join(re.escape(part) for part in expected.split("..."))
    return re.fullmatch(pattern, line.rstrip()) is not None


@pytest.fixture(scope="module")
def xentd(tmp_path_factory):
    """(address, xent binary) of a xentd on a free port, once `xent health` says SERVING."""
    xent_bin = str(xentd_process.binary("XENT_BIN", "xent"))

    def serving(address: str) -> bool:
        health = [xent_bin, "--address", address, "--timeout", "2", "health"]
        return subprocess.run(health, capture_output=True, text=True).stdout.strip() == "SERVING"

    binary = xentd_process.binary("XENTD_BIN", "xentd")
    server = xentd_process.start(binary, tmp_path_factory.mktemp("xentd") / "stderr.log", serving)
    yield server.address, xent_bin
    code = server.stop()
    assert code == 0, f"xentd exited with {code} after SIGTERM:\n{server.stderr()}"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """An empty working directory with what the Quickstart's commands read from the repository."""
    root = tmp_path_factory.mktemp("quickstart")
    skip = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".mypy_cache")
    for name in ("clients", "examples"):
        shutil.copytree(REPO_ROOT / name, root / name, ignore=skip)
    return root


def test_quickstart_commands_as_written(xentd, checkout):
    address, xent_bin = xentd
    steps = quickstart_steps()
    assert any(CARGO_XENT in s.command for s in steps), "the Quickstart no longer runs the xent CLI"
    env = {**os.environ, "XENT_ADDRESS": address}
    env.pop("VIRTUAL_ENV", None)
    for step in steps:
        done = subprocess.run(
            ["bash", "-c", runnable(step.command, xent_bin)],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        assert done.returncode == 0, f"$ {step.command}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
        if step.expected:
            printed = done.stdout.splitlines()
            ok = len(printed) == len(step.expected) and all(map(matches, step.expected, printed))
            assert ok, (
                f"$ {step.command}\nREADME shows:\n" + "\n".join(step.expected) + "\nbut it printed:\n" + done.stdout
            )


# Runs a snippet with print() recording the line of the snippet that called it.
HARNESS = """
import io, json, sys
source = open(sys.argv[1]).read()
printed = {}
def print_(*args, **kwargs):
    buffer = io.StringIO()
    __builtins__.print(*args, file=buffer, **kwargs)
    printed[sys._getframe(1).f_lineno] = buffer.getvalue().rstrip("\\n")
exec(compile(source, "README.md", "exec"), {"print": print_, "__name__": "__main__"})
__builtins__.print(json.dumps(printed))
"""


def test_quickstart_python_prints_its_comments(xentd, checkout):
    address, _ = xentd
    lines = fenced(between(README.read_text(), "quickstart-python"), "python")
    snippet = checkout / "snippet.py"
    snippet.write_text("\n".join(lines) + "\n")
    python = checkout / ".venv" / "bin" / "python"
    if not python.is_file():
        pytest.fail("the Quickstart's commands made no .venv (see the test above)", pytrace=False)
    done = subprocess.run(
        [str(python), "-c", HARNESS, str(snippet)],
        cwd=checkout,
        env={**os.environ, "XENT_ADDRESS": address},
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    printed = {int(k): v for k, v in json.loads(done.stdout.splitlines()[-1]).items()}
    expected = {
        n: m.group(1)
        for n, line in enumerate(lines, start=1)
        if (m := re.match(r"\s*print\(.*\)\s+# (.*)$", line))
    }
    assert expected, "the README's Python block has no `print(...)  # output` line"
    for n, comment in expected.items():
        assert printed.get(n) == comment, f"README.md Python line {n}: {lines[n - 1].strip()}\nprinted {printed.get(n)!r}"
