"""README's promises: the two commands, and every command line it shows exists."""

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_readme_opens_with_the_two_commands():
    first_block = README[README.index("    make demo") :].splitlines()[:2]
    assert first_block[0].split()[:2] == ["make", "demo"]
    assert first_block[1].split()[:2] == ["make", "test"]


def test_every_fedledger_command_in_the_readme_exists():
    commands = set()
    for line in README.splitlines():
        match = re.match(r"^\s{4}fedledger ((?:[a-z][a-z0-9]* ?)+)", line)
        if match:
            commands.add(tuple(w for w in match.group(1).split() if w))
    assert {("demo",), ("ledger", "verify"), ("gateway", "run"), ("agent", "run")} <= commands
    # One interpreter for all of them: the help of every command, through the real entry point.
    script = (
        "import sys, typer.testing\n"
        "from fedledger.cli import app\n"
        "runner = typer.testing.CliRunner()\n"
        "for line in sys.stdin.read().splitlines():\n"
        "    done = runner.invoke(app, [*line.split(), '--help'])\n"
        "    print(done.exit_code, line, flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        input="\n".join(" ".join(words) for words in sorted(commands)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    codes = dict(line.split(" ", 1)[::-1] for line in done.stdout.splitlines())
    assert set(codes) == {" ".join(words) for words in commands}
    assert {c: code for c, code in codes.items() if code != "0"} == {}


def test_makefile_targets_named_in_readme_exist():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    for target in ("demo", "test", "bench", "lint"):
        assert re.search(rf"^{target}:", makefile, re.M), target
