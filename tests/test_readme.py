"""The README's Python examples run as written, and CI runs the README's test command."""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_python_blocks()[index], f"README.md[python {index}]", "exec"), {})


def test_ci_runs_the_readme_test_command():
    bash = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    first_two = [b.strip() for b in bash[:2]]
    assert "exportminers mine --demo" in first_two[0]
    test_command = first_two[1].split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == test_command, (ci[-1], test_command)
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
