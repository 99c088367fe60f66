"""Model families: one module per model.task, each implementing the Family protocol (base.py).

The stages (training, evaluation, registry, publishing, serving) are generic; they ask the run's
family what differs. The family is resolved once from (model.task, model.direction), stamped into
the model's config.json as `codetune_family` and `codetune_direction`, and read back from there
when an exported model is loaded.

Adding a family: a module here with a class implementing Family, its entry in FAMILIES, and a
config in configs/ (see the README's "Adding a model family").
"""

from __future__ import annotations

from codetune.config import Direction, ModelConfig, ModelTask
from codetune.errors import ModelError
from codetune.families.base import Family, InferenceSettings, Scored
from codetune.families.causal_lm import CausalLM
from codetune.families.classification import Classification
from codetune.families.code_search import CodeSearch
from codetune.families.encoder_decoder import EncoderDecoder
from codetune.families.seq2seq import Seq2Seq

FAMILIES: dict[ModelTask, type] = {
    ModelTask.seq2seq: Seq2Seq,
    ModelTask.encoder_decoder: EncoderDecoder,
    ModelTask.causal_lm: CausalLM,
    ModelTask.classification: Classification,
    ModelTask.code_search: CodeSearch,
}
FAMILY_KEY, DIRECTION_KEY = "codetune_family", "codetune_direction"

__all__ = ["FAMILIES", "Family", "InferenceSettings", "Scored", "family_of", "family_of_model", "stamp"]


def family_of(model: ModelConfig) -> Family:
    """The family a config's model.task and model.direction name."""
    return FAMILIES[model.task](model.direction)


def stamp(model, family: Family):
    """Record the family in the model's config, so the saved config.json says what the model is."""
    setattr(model.config, FAMILY_KEY, family.task.value)
    setattr(model.config, DIRECTION_KEY, family.direction.value)
    return model


def family_of_model(config) -> Family:
    """The family stamped into a model's config (a PretrainedConfig)."""
    task = getattr(config, FAMILY_KEY, None)
    if task is None:
        raise ModelError(
            f"the model's config.json has no '{FAMILY_KEY}': it was not exported by codetune (or by one older than "
            f'model families); re-export it with `codetune run`, or add "{FAMILY_KEY}": "<model.task>" to config.json'
        )
    return FAMILIES[ModelTask(task)](Direction(getattr(config, DIRECTION_KEY, Direction.code_to_text.value)))
