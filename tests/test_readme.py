"""The README's example really runs, and its commands match what CI does."""

import re
import subprocess
import sys

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_readme_example_runs():
    block = README.split("<!-- readme-example")[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[ 5. -5. -5.]" in proc.stdout


def test_functional_does_not_import_flax():
    code = "import sys, grassjax.functional; assert 'flax' not in sys.modules, 'flax imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    test_command = next(c for c in commands if "pytest" in c)
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_command.strip() in ci_lines, f"{test_command!r} is not a line of .ci/run"  # run as is, not a variant


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [REPO / "README.md", REPO / "PERFORMANCE.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address, or an anchor in the same page
            path = target.split("#")[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken
    assert len(pages) > 5  # the docs pages exist


def test_the_readme_stays_short_and_shows_what_the_main_command_prints():
    assert len(README.split()) <= 2000
    assert len((REPO / "PERFORMANCE.md").read_text().split()) <= 1500
    tail = README.split("### What the main command prints at its end")[1].split("```")[1]
    assert "done: 2000 steps in" in tail and "best val loss" in tail
