"""The one place a family is registered; the schema takes model.task's choices from here (names only, so reading a
config imports no torch)."""

REGISTERED = {
    "seq2seq": "codetune.core.families.seq2seq:Seq2Seq",
    "encoder_decoder": "codetune.core.families.encoder_decoder:EncoderDecoder",
    "causal_lm": "codetune.core.families.causal_lm:CausalLM",
    "classification": "codetune.core.families.classification:Classification",
    "code_search": "codetune.core.families.code_search:CodeSearch",
}
"""model.task -> the class implementing it."""

BY_DIRECTION = {
    ("causal_lm", "fill_in_middle"): "codetune.core.families.fill_in_middle:FillInMiddle",
    ("causal_lm", "chat"): "codetune.core.families.chat:Chat",
}
"""(model.task, model.direction) -> the class, where a direction is built differently from its task's others (a
completion model trains on whole files, a chat model on conversations, not on pairs)."""
