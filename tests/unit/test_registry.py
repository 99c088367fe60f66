import json
import shutil
from pathlib import Path

import mlflow
import pytest

from codetune.core.config.loader import load_config
from codetune.core.data import Examples, prepare_data
from codetune.core.families import family_of
from codetune.core.training import train_model
from codetune.lifecycle.registry import CHALLENGER, CHAMPION, decide_alias, register_model
from tests.conftest import TWIN


@pytest.mark.parametrize(
    "score, champion, alias, reason",
    [
        (12.0, None, CHAMPION, "first version"),
        (3.0, None, CHALLENGER, "below registry.min_score"),
        (12.0, 10.0, CHAMPION, "beats the champion's 10.00"),
        (9.0, 10.0, CHALLENGER, "does not beat"),
        (10.0, 10.0, CHALLENGER, "does not beat"),
    ],
)
def test_promotion_gate(score, champion, alias, reason):
    got_alias, got_reason = decide_alias("bleu4_smoothed", score, min_score=5.0, champion_value=champion)
    assert got_alias == alias and reason in got_reason


@pytest.fixture
def tracked(tiny_cfg, tmp_path, monkeypatch):
    """A trained tiny model, an MLflow SQLite store, and a function that registers a model with given metrics.

    Each call registers another model (a copy of the trained one whose config.json says which copy it
    is), since registering the same model twice gives back its first version.
    """
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts under ./mlruns
    data = prepare_data(tiny_cfg.data, Examples.pairs)
    trained = train_model(tiny_cfg, data, family_of(tiny_cfg.model))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("registry-test")
    cfg = load_config(TWIN, ["training.max_source_length=64", "registry.min_score=5", "registry.model_name=summarizer"])
    rows = data.load("test")[:4]
    copies = []

    def register(bleu: float, split: str = "split-a", run_dir: Path | None = None):
        if run_dir is None:
            run_dir = tmp_path / f"copy-{len(copies)}"
            shutil.copytree(trained.run_dir, run_dir)
            config = json.loads((run_dir / "config.json").read_text())
            (run_dir / "config.json").write_text(json.dumps({**config, "copy": len(copies)}))
            copies.append(run_dir)
        with mlflow.start_run() as run:
            pass
        return register_model(
            cfg, run_dir, run.info.run_id, {"bleu4_smoothed": bleu}, rows, split, {"git_commit": "abc"}
        )

    yield register
    mlflow.set_tracking_uri(None)


def test_champion_moves_only_to_better_versions_and_serves_summaries(tracked):
    low = tracked(3.0)
    assert (low.alias, low.version) == (CHALLENGER, "1")
    first = tracked(8.0)
    assert first.alias == CHAMPION and "first version" in first.reason
    worse = tracked(7.0)
    assert worse.alias == CHALLENGER and "does not beat the champion's 8.00" in worse.reason
    better = tracked(9.5)
    assert better.alias == CHAMPION

    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("summarizer", CHAMPION).version) == better.version
    version = client.get_model_version("summarizer", worse.version)
    assert version.tags["promotion"].startswith("challenger: ") and version.tags["git_commit"] == "abc"

    consumer = mlflow.pyfunc.load_model("models:/summarizer@champion")
    summaries = consumer.predict(["def add(a, b): return a + b", "def area(w, h):\n    return w * h\n"])
    assert len(summaries) == 2 and all(isinstance(s, str) for s in summaries)


def test_champion_scored_on_another_split_is_rescored_on_this_one(tracked):
    tracked(50.0, split="old-split")  # a number the champion cannot reach on this split
    challenger = tracked(6.0, split="new-split")
    # The untrained-looking tiny champion scores far below 6 when re-scored here, so the newcomer wins.
    assert challenger.alias == CHAMPION and "on the same test split" in challenger.reason


def test_registering_the_same_model_again_reuses_its_version_and_decision(tracked, tmp_path):
    first = tracked(8.0)
    again = tracked(8.0, run_dir=tmp_path / "copy-0")  # a retried task, or a second `codetune deploy`
    assert (again.version, again.alias, again.reason) == (first.version, first.alias, first.reason)
    assert len(mlflow.MlflowClient().search_model_versions("name = 'summarizer'")) == 1


def test_a_registry_failure_during_promotion_fails_closed(tracked):
    champion = tracked(8.0, split="old-split")
    client = mlflow.MlflowClient()
    # The champion must be re-scored on the new split, and its model can no longer be loaded.
    source = client.get_model_version("summarizer", champion.version).source
    shutil.rmtree(mlflow.get_logged_model(source.removeprefix("models:/")).artifact_location.removeprefix("file://"))
    with pytest.raises(Exception):  # noqa: B017 - whatever the registry raises, the promotion must fail
        tracked(9.0, split="new-split")
    newcomer = client.search_model_versions("name = 'summarizer'", order_by=["version_number DESC"])[0]
    assert newcomer.version != champion.version and not newcomer.aliases
    assert newcomer.tags["promotion"].startswith("undecided: ")
    assert str(client.get_model_version_by_alias("summarizer", CHAMPION).version) == champion.version


def test_a_benchmark_gated_champion_keeps_its_score_on_another_test_split():
    """HumanEval is the same problems whatever the test split: the champion's recorded pass@1 is what is compared."""
    from types import SimpleNamespace

    from codetune.lifecycle.registry import _champion_score

    cfg = load_config("configs/code-generation.yaml")
    champion = SimpleNamespace(version="3", tags={"metric.humaneval_pass_at_1": "4.27", "test_split": "old"})
    assert _champion_score(cfg, champion, "new", test_rows=[]) == 4.27
