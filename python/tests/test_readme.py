"""The README's "From Python" example, run exactly as it stands (from a directory where
``target/release/agentd`` is the binary under test)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def examples() -> list:  # type: ignore[type-arg]
    text = README.read_text()
    section = text.split("## From Python", 1)[1].split("<!-- End of the section", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def example() -> str:
    return examples()[0]  # type: ignore[no-any-return]


def test_example_is_ten_lines() -> None:
    assert len(example().strip().splitlines()) == 10


def test_readme_example_runs(agentd_bin: str, tmp_path: pathlib.Path) -> None:
    (tmp_path / "target" / "release").mkdir(parents=True)
    os.symlink(agentd_bin, tmp_path / "target" / "release" / "agentd")
    script = tmp_path / "example.py"
    script.write_text(example())
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    lines = r.stdout.decode().splitlines()
    assert lines[0].startswith("Linux ")
    assert lines[1] == "hello from the host"
    assert re.fullmatch(r"exit 0, ping \d+\.\d\d ms", lines[2]), lines


def test_readme_extension_example_runs(agentd_bin: str, tmp_path: pathlib.Path) -> None:
    code = examples()[1]
    assert len(code.strip().splitlines()) <= 12
    (tmp_path / "target" / "release").mkdir(parents=True)
    os.symlink(agentd_bin, tmp_path / "target" / "release" / "agentd")
    script = tmp_path / "example.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().splitlines() == ["hello from the host", "['hello.txt'] 0o644", "['demo'] 0"]
    assert (tmp_path / "copy" / "in" / "hello.txt").read_text() == "hello from the host\n"
