import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from codetune.core.config.loader import load_config
from codetune.core.data import PreparedData
from codetune.core.errors import ConfigError
from codetune.core.rundir import RunDir, run_key, run_name

DATA = PreparedData(directory="", fingerprint="f" * 64, counts={}, sha256={})


def test_settings_that_do_not_change_the_weights_keep_the_run():
    base = load_config()
    assert run_name(load_config(None, ["training.timeout_minutes=90", "training.logging_steps=5"]), DATA) == run_name(
        base, DATA
    )
    assert run_key(load_config(None, ["training.learning_rate=5e-4"]), DATA) != run_key(base, DATA)


def test_a_run_directory_belongs_to_one_configuration(tmp_path):
    run = RunDir(tmp_path / "shared-name")
    run.claim("key-of-config-a", "recipe-1")
    run.claim("key-of-config-a", "recipe-1")  # the same configuration again: a resume
    with pytest.raises(ConfigError, match="holds a run of a different configuration.*training.run_name"):
        run.claim("key-of-config-b", "recipe-1")


def test_a_run_of_other_training_code_is_neither_resumed_nor_reused(tmp_path, caplog):
    named = RunDir(tmp_path / "named")
    named.claim("key", "recipe-1")
    with pytest.raises(ConfigError, match="trained by other codetune code.*leave it null to train anew"):
        named.claim("key", "recipe-2")
    with caplog.at_level(logging.WARNING, logger="codetune.core.rundir"):
        RunDir(tmp_path / "hashed-by-recipe-2").claim("key", "recipe-2")
    assert f"{named.path} hold this configuration trained by other codetune code; not reused" in caplog.text


def test_the_run_name_follows_the_code_that_trains(tmp_path, monkeypatch):
    """A changed training module names another directory, though the settings' key stays."""
    from codetune.core import rundir

    cfg = load_config()
    before = run_name(cfg, DATA)
    core = tmp_path / "core"
    core.mkdir()
    for module in rundir.RECIPE_MODULES:
        (core / module).write_text((Path(rundir.__file__).parent / module).read_text())
    (core / "training.py").write_text((core / "training.py").read_text() + "\n# a changed recipe\n")
    monkeypatch.setattr(rundir, "__file__", str(core / "rundir.py"))
    rundir.recipe_code.cache_clear()
    assert run_name(cfg, DATA) != before and run_key(cfg, DATA) == run_key(load_config(), DATA)
    monkeypatch.undo()
    rundir.recipe_code.cache_clear()
    assert run_name(cfg, DATA) == before


def test_a_second_run_of_the_same_directory_waits_for_the_first(tmp_path):
    holder = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from codetune.core.rundir import RunDir
        with RunDir({str(tmp_path)!r}).lock():
            print("held", flush=True)
            time.sleep(2)
            Path({str(tmp_path / "first-done")!r}).touch()
    """)
    first = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    assert first.stdout.readline().strip() == "held"
    with RunDir(tmp_path).lock():
        assert (tmp_path / "first-done").exists()  # entered only after the first run let go
    first.wait(timeout=30)
    assert (tmp_path / ".lock").exists() and ".lock" not in [p.name for p in RunDir(tmp_path).model_files()]
