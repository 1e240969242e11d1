"""The README's Python example runs as written (the block between the kvcrunch-python-example markers)."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_readme_example_runs(model_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    m = re.search(r"<!-- kvcrunch-python-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md has no kvcrunch-python-example block"
    code = m.group(1)
    assert len(code.strip().splitlines()) <= 6
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"saved \d+ bytes", r.stdout), r.stdout
