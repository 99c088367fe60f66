"""classification: an encoder with a classification head labels code (e.g. CodeXGLUE defect detection)."""

from __future__ import annotations

from collections import Counter

import torch
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, RobertaForSequenceClassification

from codetune.core.config import Config, ModelTask
from codetune.core.data import Examples
from codetune.core.errors import DataError
from codetune.core.families.base import (
    Card,
    FamilyDefaults,
    InferenceSettings,
    Scored,
    in_length_order,
    input_texts,
    roberta_config,
    scored_predictions,
)
from codetune.core.metrics import classification_metrics


def label_maps(labels: list[str]) -> dict:
    """id2label/label2id for a classification head; labels sorted so the ids do not depend on data order."""
    labels = sorted(labels)
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }


def classify(model, tokenizer, codes: list[str], batch_size: int, max_source_length: int) -> list[dict]:
    """The label the classifier gives each code and its probability, {"label", "score"}."""

    @torch.inference_mode()
    def classify_batch(batch_codes: list[str]) -> list[dict]:
        batch = tokenizer(batch_codes, max_length=max_source_length, truncation=True, padding=True, return_tensors="pt")
        scores, label_ids = model(**batch.to(model.device)).logits.softmax(-1).max(-1)
        return [
            {"label": model.config.id2label[label_id], "score": round(score, 6)}
            for label_id, score in zip(label_ids.tolist(), scores.tolist())
        ]

    return in_length_order(codes, batch_size, classify_batch)


class Classification(FamilyDefaults):
    task = ModelTask.classification
    examples = Examples.labelled
    registered_name = "codetune-code-classifier"
    architecture = "RoBERTa"
    peft_task_type = "SEQ_CLS"  # peft keeps the new classification head trainable
    auto_class = AutoModelForSequenceClassification
    primary_metric = "accuracy"
    card = Card(
        "text-classification",
        "Labels a function's source code with one of the classes it was trained on.",
        "accuracy, macro F1 and MCC, x100",
    )
    scores_untuned = False
    batches_by_length = True

    def build_scratch(self, arch, tokenizer, labels):
        return RobertaForSequenceClassification(roberta_config(arch, tokenizer, arch.num_layers, **label_maps(labels)))

    def load_base(self, name, tokenizer, labels, **hub):
        """A new head, sized to the labels in the data."""
        return AutoModelForSequenceClassification.from_pretrained(name, **label_maps(labels), **hub)

    def tokenize(self, rows, tokenizer, cfg: Config, label2id):
        unknown = sorted({r["label"] for r in rows} - set(label2id))
        if unknown:
            raise DataError(
                f"labels {unknown} are not in the train split ({sorted(label2id)}): add training examples for them"
            )
        encoded = tokenizer([r["code"] for r in rows], max_length=cfg.training.max_source_length, truncation=True)
        return [
            {"input_ids": ids, "attention_mask": mask, "labels": label2id[r["label"]]}
            for ids, mask, r in zip(encoded["input_ids"], encoded["attention_mask"], rows)
        ]

    def collator(self, tokenizer, model, pad_to_multiple_of):
        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def predict(self, model, tokenizer, model_input, settings: InferenceSettings) -> list[dict]:
        """Each code's label and the classifier's probability for it."""
        codes = input_texts(model_input)
        return classify(model, tokenizer, codes, settings.batch_size, settings.max_source_length)

    def score(self, model, tokenizer, rows: list[dict], settings: InferenceSettings) -> Scored:
        codes, labels = [r["code"] for r in rows], [r["label"] for r in rows]
        majority = Counter(labels).most_common(1)[0][0]
        baseline = ("majority class", [majority] * len(rows))
        predictions = [p["label"] for p in self.predict(model, tokenizer, codes, settings)]
        return scored_predictions(rows, codes, labels, predictions, baseline, classification_metrics)
