"""The MLflow pyfunc model a consumer loads: `mlflow.pyfunc.load_model("models:/<name>@champion").predict(...)`.

What predict takes and returns is the model's family's: a summary per code (a function per summary
for model.direction=text_to_code), a label per code for a classifier, and for a code-search model,
given `pd.DataFrame({"query": [...], "code": [...]})`, each pair's cosine similarity.

A custom pyfunc rather than the transformers flavour: transformers 5 removed the
text2text-generation pipeline that flavour needs for T5/CodeT5. It is logged as code (MLflow
"models from code") with the codetune package beside it, so loading unpickles nothing.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class CodeModel(PythonModel):
    def load_context(self, context):
        import torch

        from codetune.core.families import InferenceSettings, family_of_model
        from codetune.core.model import load_exported

        self.settings = InferenceSettings.load(context.artifacts["settings"])
        model, self.tokenizer = load_exported(context.artifacts["model"])
        self.family = family_of_model(model.config)
        self.model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()

    def predict(self, context, model_input, params=None) -> list[str] | list[float]:
        return self.family.predict(self.model, self.tokenizer, model_input, self.settings)

    def generate(self, route: str, prompts: list, sampling):
        """The OpenAI routes' completions (codetune serve): route "completions" takes (prompt, suffix) pairs, "chat"
        conversations. A ValueError says what this model cannot answer."""
        answer = getattr(self.family, "chat" if route == "chat" else "complete", None)
        if answer is None:
            raise ValueError(
                f"a {self.family.task.value} model does not generate text from a prompt: use /invocations "
                "(MLflow's scoring protocol)"
            )
        return answer(self.model, self.tokenizer, prompts, self.settings, sampling)


mlflow.models.set_model(CodeModel())
