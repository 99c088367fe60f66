import json

import mlflow
import pytest

from codetune.core.config import DataConfig, MonitorConfig
from codetune.core.config.loader import load_config
from codetune.core.data import Examples
from codetune.core.data.prepare import read_source
from codetune.core.data.profile import function_key, profile_splits
from codetune.core.errors import ConfigError, DataError
from codetune.core.families.base import Scored
from codetune.lifecycle.monitoring import (
    DriftCheck,
    DriftReport,
    compare,
    embedding_check,
    plot,
    quality_check,
    read_served_inputs,
    served_checks,
)
from codetune.lifecycle.registry import find_champion
from codetune.lifecycle.tracking import TrackingError
from tests.conftest import TWIN

SETTINGS = MonitorConfig()


@pytest.fixture(scope="module")
def stdlib(tmp_path_factory) -> list[dict]:
    """1,200 real functions of the stdlib, in the order the data stage keeps them."""
    return read_source(DataConfig(max_examples=1200), Examples.pairs)


def _split(examples: list[dict]) -> dict[str, list[dict]]:
    return {"train": examples[:-100], "validation": examples[-100:-50], "test": examples[-50:]}


def _synthetic(n: int, lines: int) -> list[dict]:
    """Functions unlike the stdlib's: long, repetitive, with identifiers no stdlib function uses."""
    body = "".join(f"    zorp_{i} = frobnicate_widget(zorp_{i - 1}, quux)\n" for i in range(1, lines))
    return [
        {"code": f"def widget_{k}(quux):\n    zorp_0 = quux\n{body}    return zorp_{lines - 1}\n", "summary": "w " * 20}
        for k in range(n)
    ]


def test_a_function_is_known_by_its_code_whitespace_aside():
    assert function_key("def f(x):\n    return x\n") == function_key("def f(x):\n        return  x")
    assert function_key("def f(x):\n    return x\n") != function_key("def f(y):\n    return y\n")


def test_the_profile_holds_every_split_and_the_train_splits_distributions(stdlib):
    splits = _split(stdlib)
    profile = profile_splits(splits)
    assert len(profile["code_hashes"]) == len({function_key(ex["code"]) for ex in stdlib})
    assert len(profile["code_tokens"]) == len(profile["summary_words"]) == len(splits["train"])
    assert len(profile["sample"]) == 512 and profile["sample"] == profile_splits(splits)["sample"]
    assert "self" in profile["identifiers"] and not {"if", "None", "return"} & set(profile["identifiers"])
    json.dumps(profile)  # it is stored as JSON


def test_the_training_source_does_not_drift_from_itself(stdlib):
    profile = profile_splits(_split(stdlib))
    checks, seen, fresh = compare(profile, stdlib, SETTINGS, embed=False)
    assert fresh == [] and not [c.feature for c in checks if c.drifted]
    assert checks[0].value == 0.0 and all(c.value < 0.1 for c in checks)


def test_a_profile_of_another_version_is_refused_with_the_fix(stdlib):
    profile = profile_splits(_split(stdlib)) | {"version": 0}
    with pytest.raises(DataError, match="profile is version 0, this codetune reads version 1: retrain the champion"):
        compare(profile, stdlib, SETTINGS, embed=False)


def test_functions_unlike_the_training_data_drift_on_every_data_check(stdlib):
    profile = profile_splits(_split(stdlib))
    current = stdlib[:200] + _synthetic(400, lines=30)
    checks, seen, fresh = compare(profile, current, SETTINGS, embed=False)
    by_feature = {c.feature: c for c in checks}
    assert len(fresh) == 400 and by_feature["new functions"].value == pytest.approx(400 / 600)
    assert {"new functions", "code length", "summary length", "identifier vocabulary"} == {
        c.feature for c in checks if c.drifted
    }
    assert seen.identifier_shares[0][0].startswith(("zorp_", "quux", "frobnicate_widget"))


def test_a_length_shift_in_a_handful_of_functions_is_not_significant(stdlib):
    """A KS D past the threshold from 5 functions is chance (p > 0.05): not drift."""
    profile = profile_splits(_split(stdlib))
    checks, _, _ = compare(profile, stdlib[:3] + _synthetic(2, lines=10), SETTINGS, embed=False)
    code_length = next(c for c in checks if c.feature == "code length")
    assert code_length.value > SETTINGS.max_length_shift and code_length.p_value > 0.05 and not code_length.drifted


def test_a_classifier_tells_other_code_from_the_training_code_by_its_embedding_and_not_the_stdlib_from_itself(stdlib):
    reference, rest = [ex["code"] for ex in stdlib[:150]], [ex["code"] for ex in stdlib[150:300]]
    same, _ = embedding_check(reference, rest, SETTINGS.max_embedding_auc, None)
    other, (embedded, _) = embedding_check(
        reference, [ex["code"] for ex in _synthetic(150, 8)], SETTINGS.max_embedding_auc, None
    )
    assert same.value < 0.6 and not same.drifted
    assert other.value > 0.9 and other.drifted and embedded.shape == (150, 384)


def _scoring(bleu: float, asked: list):
    def score(rows):
        asked.append(rows)
        examples = [{"input": r["code"], "reference": "Add.", "prediction": "Sum."} for r in rows]
        return Scored({"bleu": bleu}, {}, "", [], examples)

    return score


def test_quality_is_the_relative_drop_on_new_pairs_and_not_measured_without_them():
    asked = []
    check, examples = quality_check("bleu", 20.0, [{"code": "def f(): pass"}] * 3, _scoring(12.0, asked), 0.2)
    assert check.value == pytest.approx(0.4) and check.drifted and len(asked[0]) == 3 and len(examples) == 3
    held, _ = quality_check("bleu", 20.0, [{"code": "x"}], _scoring(19.0, asked), 0.2)
    assert held.value == pytest.approx(0.05) and not held.drifted
    unmeasured, none = quality_check("bleu", 20.0, [], lambda rows: pytest.fail("nothing to score"), 0.2)
    assert unmeasured.value is None and not unmeasured.drifted and none == []


def test_the_report_names_what_drifted_and_plots_it(stdlib, tmp_path):
    profile = profile_splits(_split(stdlib))
    checks, seen, fresh = compare(profile, _synthetic(50, 30), SETTINGS, embed=False)
    _, examples = quality_check("bleu", 20.0, fresh[:2], _scoring(10.0, []), 0.2)
    unmeasured = DriftCheck("champion bleu", "drop", None, 0.2)
    report = DriftReport("src/", "m v1", 1200, 50, len(fresh), [*checks, unmeasured], examples)
    markdown = report.to_markdown()
    assert (
        "**Drift: new functions, code length" in markdown
        and "| champion bleu | drop | n/a | 0.2 | not measured" in markdown
    )
    assert "### The champion on new functions" in markdown and "| `def widget_0(quux):` | Add. | Sum. |" in markdown
    assert report.metrics()["new_functions"] == 1.0 and "champion_bleu" not in report.metrics()
    figure = plot(seen, "src/ against m v1", tmp_path / "drift.png")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_monitor_thresholds_are_validated():
    with pytest.raises(ConfigError, match="monitor.max_embedding_auc must be between 0 and 1"):
        load_config(TWIN, ["monitor.max_embedding_auc=1.5"])


def test_a_model_without_a_champion_or_without_a_profile_is_named_with_the_fix(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(TWIN, [f"mlflow.tracking_uri={uri}", "registry.model_name=watched"])
    with pytest.raises(TrackingError, match="'watched' has no champion .*train and register one"):
        find_champion(cfg)
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("old"))
    client.create_registered_model("watched")
    version = client.create_model_version("watched", f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias("watched", "champion", version.version)
    with pytest.raises(TrackingError, match="watched v1 .* has no data_profile.json: .* retrain it"):
        find_champion(cfg)


def test_served_inputs_are_checked_as_code_and_a_missing_log_directory_is_named(stdlib, tmp_path):
    from server.app import log_inputs

    profile = profile_splits(_split(stdlib))
    log_inputs(tmp_path / "same", [ex["code"] for ex in stdlib[:300]] * 2, "1")  # asked twice: counted once
    same = served_checks(profile, read_served_inputs(tmp_path / "same"), SETTINGS)
    assert [c.feature for c in same] == [
        "served new functions",
        "served code length",
        "served identifier vocabulary",
        "served code embedding",
    ]
    assert same[0].value == 0.0 and not any(c.drifted for c in same)
    log_inputs(tmp_path / "other", [ex["code"] for ex in _synthetic(200, 30)], "1")
    other = served_checks(profile, read_served_inputs(tmp_path / "other"), SETTINGS)
    assert all(c.drifted for c in other)
    with pytest.raises(ConfigError, match="monitor.served_inputs='.*nowhere' is not a directory"):
        read_served_inputs(tmp_path / "nowhere")


def test_a_source_that_is_missing_or_has_nothing_to_compare_is_named(tmp_path):
    with pytest.raises(DataError, match="data.path='.*nowhere' is not a directory"):
        read_source(DataConfig(path=str(tmp_path / "nowhere")), Examples.pairs)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "m.py").write_text("x = 1\n")
    with pytest.raises(DataError, match="no examples in .*empty .*documented functions"):
        read_source(DataConfig(path=str(tmp_path / "empty")), Examples.pairs)
