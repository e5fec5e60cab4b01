"""Constants that several modules share."""

__all__ = ["IGNORE_INDEX", "LabelReason"]

IGNORE_INDEX = -100  # the label of a position the loss skips (PyTorch's `cross_entropy` default, transformers' too)


class LabelReason:
    """Why a token is supervised or masked (used by `VisionChatCollator.explain`)."""

    ASSISTANT = "supervised: assistant turn"
    PROMPT_CUE = "masked: assistant prompt cue (what add_generation_prompt renders)"
    ADDED_EOS = "supervised: end-of-turn appended by the collator"
    IMAGE = "masked: image token"
    PADDING = "masked: padding"
    SYSTEM = "masked: system turn"
    USER = "masked: user turn"
    TEMPLATE = "masked: chat-template text outside any turn"
