from pathlib import Path

import pytest

from codetune.core.errors import ConfigError
from codetune.lifecycle.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[2]
TINY_SWEEP = ROOT / "configs" / "sweeps" / "tiny-seq2seq.yaml"


def write_sweep(tmp_path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(f"config: {ROOT / 'configs' / 'tiny-seq2seq.yaml'}\n{text}")
    return path


@pytest.mark.parametrize("sweep", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweeps_are_valid(sweep, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = load_sweep(sweep)
    assert spec.parameters and spec.study_name == sweep.stem


def test_a_parameter_typo_gets_did_you_mean(tmp_path):
    path = write_sweep(tmp_path, "parameters:\n  training.lerning_rate: {low: 1.0e-4, high: 1.0e-2}\npruner: none\n")
    with pytest.raises(ConfigError, match="did you mean 'training.learning_rate'"):
        load_sweep(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("parameters:\n  training.learning_rate: {low: 1, high: 0.1}\npruner: none\n", "must be below high"),
        ("parameters:\n  peft.r: {low: 4}\npruner: none\n", "either choices"),
        ("parameters:\n  data.max_examples: {choices: [10, 20]}\npruner: none\n", "same data splits"),
        ("parameters:\n  peft.r: {choices: [4, 8]}\n", "set training.eval_steps"),
        ("parameters:\n  peft.r: {choices: [4, 8]}\npruner: none\ntrails: 3\n", "unknown key 'trails'"),
        ("parameters:\n  peft.r: {choices: [4, 8]}\npruner: none\ntrials: many\n", "trials: Value 'many'"),
    ],
)
def test_a_bad_sweep_names_the_problem(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(write_sweep(tmp_path, text))


def test_overrides_reach_the_sweep_and_every_bound_is_a_valid_config(tmp_path):
    path = write_sweep(tmp_path, "parameters:\n  training.num_train_epochs: {low: 1, high: 3}\npruner: none\n")
    assert load_sweep(path, ["trials=3", "parallelism=2"]).trials == 3
    path = write_sweep(tmp_path, "parameters:\n  evaluation.max_examples: {choices: [0, 8]}\npruner: none\n")
    with pytest.raises(ConfigError, match="evaluation.max_examples"):  # its first choice is no valid setting
        load_sweep(path)


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_the_pruner_stops_the_worse_loss_whichever_way_the_study_optimises(tmp_path, direction):
    """Trials report validation losses; a study maximising BLEU must still prune the trial whose loss is higher."""
    import optuna
    from transformers import TrainerControl, TrainerState

    from codetune.lifecycle.sweep import TrialRef, pruning_callback

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction=direction)

    def run(loss: float) -> bool:
        trial = study.ask()
        callback = pruning_callback(TrialRef(storage, "s", trial.number, pruning=True))
        control, state = TrainerControl(), TrainerState(global_step=25)
        callback.on_evaluate(None, state, control, metrics={"eval_loss": loss})
        if control.should_training_stop:
            study.tell(trial.number, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial.number, 1.0)
        return control.should_training_stop

    for loss in (3.0, 3.1):  # the pruner's two startup trials, completed
        trial = study.ask()
        pruning_callback(TrialRef(storage, "s", trial.number, pruning=True)).on_evaluate(
            None, TrainerState(global_step=25), TrainerControl(), metrics={"eval_loss": loss}
        )
        study.tell(trial.number, 1.0)
    assert run(2.9) is False  # better than the median loss: goes on
    assert run(3.5) is True  # worse: stopped
