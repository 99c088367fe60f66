"""The MLflow pyfunc model a consumer loads: `mlflow.pyfunc.load_model("models:/<name>@champion").predict([code, ...])`
returns a summary per code (a function per summary for model.direction=text_to_code, a label for a classifier); a code-search model's `.predict(pd.DataFrame({"query": [...],
"code": [...]}))` returns each pair's cosine similarity.

A custom pyfunc rather than the transformers flavour: transformers 5 removed the
text2text-generation pipeline that flavour needs for T5/CodeT5. It is logged as code (MLflow
"models from code") with the codetune package beside it, so loading unpickles nothing.
"""

from __future__ import annotations

import json

import mlflow
from mlflow.pyfunc import PythonModel


class CodeModel(PythonModel):
    def load_context(self, context):
        import torch

        from codetune.config import GenerationConfig
        from codetune.model import load_exported

        model_dir = context.artifacts["model"]
        with open(context.artifacts["generation"]) as f:
            settings = json.load(f)
        self.max_source_length = settings.pop("max_source_length")
        self.max_query_length = settings.pop("max_query_length")
        self.prompt = settings.pop("prompt")
        self.writes_code = settings.pop("writes_code")
        self.generation = GenerationConfig(**settings)
        model, self.tokenizer = load_exported(model_dir)
        self.model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()

    def predict(self, context, model_input, params=None) -> list[str] | list[float]:
        from codetune.code_search import pair_similarity
        from codetune.evaluation import predict

        if hasattr(model_input, "columns") and {"query", "code"} <= set(model_input.columns):
            queries, codes = model_input["query"].astype(str).tolist(), model_input["code"].astype(str).tolist()
            return pair_similarity(self.model, self.tokenizer, queries, codes, self.generation.batch_size, self.max_query_length, self.max_source_length)
        if hasattr(model_input, "iloc"):  # a DataFrame: the first column holds the input
            model_input = model_input.iloc[:, 0].tolist()
        texts = [model_input] if isinstance(model_input, str) else [str(c) for c in model_input]
        return predict(self.model, self.tokenizer, texts, self.generation, self.max_source_length, self.prompt, self.writes_code)


mlflow.models.set_model(CodeModel())
