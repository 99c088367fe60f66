"""The values a configuration key chooses from."""

from enum import Enum

from codetune.core.families.registry import REGISTERED


class ModelInit(str, Enum):
    pretrained = "pretrained"
    scratch = "scratch"


class PublishedWeights(str, Enum):
    merged = "merged"
    adapter = "adapter"
    both = "both"


class GGUFPrecision(str, Enum):
    f16 = "f16"
    q8_0 = "q8_0"


# One per registered family (codetune/core/families/registry.py); a family added there is a choice here.
ModelTask = Enum("ModelTask", [(task, task) for task in REGISTERED], type=str, module=__name__)


class Direction(str, Enum):
    code_to_text = "code_to_text"
    text_to_code = "text_to_code"
    fill_in_middle = "fill_in_middle"
    chat = "chat"


class Benchmark(str, Enum):
    humaneval = "humaneval"


class BenchmarkMode(str, Enum):
    completion = "completion"
    """The model continues the problem's prompt (a signature and docstring)."""
    instruct = "instruct"
    """The prompt is a user message through the chat template; the answer's fenced code is the solution (EvalPlus)."""


# causal_lm: what the output follows when model.prompt_template is null.
DEFAULT_PROMPTS = {Direction.code_to_text: "{code}\n# Summary:", Direction.text_to_code: "# {summary}\n"}


class DataSource(str, Enum):
    code_tree = "code_tree"
    files = "files"
    hub = "hub"


class ConversationFormat(str, Enum):
    auto = "auto"
    messages = "messages"
    sharegpt = "sharegpt"
    alpaca = "alpaca"
    prompt_completion = "prompt_completion"


class TrainedTurns(str, Enum):
    all = "all"
    last = "last"
