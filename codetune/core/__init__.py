"""The core: what `codetune train` needs (config, data, families, model, training, evaluation, execution), with torch,
transformers and peft only. It imports nothing of codetune.lifecycle, tasks/ or flows/ (tests/unit/test_layers.py)."""
