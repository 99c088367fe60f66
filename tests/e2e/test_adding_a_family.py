"""docs/adding-a-family.md's example, applied as written to a copy of the repository, validates and trains."""

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, TINY

EXAMPLE_FILES = {
    "codetune/core/families/docstring.py",
    "codetune/core/families/registry.py",
    "configs/tiny-docstring.yaml",
}


def _copy_of_the_repository(target: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(source.read_bytes())
    return target


def test_the_documented_family_is_three_files_that_validate_and_train(tmp_path, stdlib_cache):
    patch = re.search(r"```diff\n(.*?)```", (ROOT / "docs" / "adding-a-family.md").read_text(), re.S).group(1)
    assert set(re.findall(r"^\+\+\+ b/(\S+)", patch, re.M)) == EXAMPLE_FILES
    repo = _copy_of_the_repository(tmp_path / "repo")
    (tmp_path / "example.diff").write_text(patch)
    subprocess.run(["git", "apply", str(tmp_path / "example.diff")], cwd=repo, check=True)

    def cli(*args):
        # From the copy's root, so `codetune` imports the copy's package, not the installed one.
        return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=repo, capture_output=True, text=True)

    on_default_weights = cli("config", "model.task=docstring")
    assert on_default_weights.returncode == 0, on_default_weights.stderr
    refused = cli("config", "model.task=docstring", "model.direction=text_to_code")
    assert refused.returncode == 2 and "model.direction=text_to_code needs a generative model.task" in refused.stderr

    runs = tmp_path / "runs"
    overrides = TINY + [f"data.cache_dir={stdlib_cache}", f"training.output_dir={runs}", "training.run_name=doc"]
    trained = cli("train", "--config", "configs/tiny-docstring.yaml", *overrides)
    assert trained.returncode == 0, trained.stderr[-3000:]
    export = json.loads((runs / "doc" / "config.json").read_text())
    assert export["codetune_family"] == "docstring"
    metrics = json.loads((runs / "doc" / "metrics.json").read_text())
    assert "bleu4_smoothed" in metrics["model"]
