"""Constants that several modules share."""

__all__ = ["ADAPTER_WEIGHT_FILES", "FULL_WEIGHT_FILES", "IGNORE_INDEX", "LabelReason"]

# The weight files a saved model (full weights) or LoRA adapter directory holds, in the layouts transformers and PEFT
# write.
FULL_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
IGNORE_INDEX = -100  # the label of a position the loss skips (PyTorch's `cross_entropy` default, transformers' too)


class LabelReason:
    """Why a token is supervised or masked (used by `VisionChatCollator.explain`)."""

    ASSISTANT = "supervised: assistant turn"
    ASSISTANT_CONTEXT = "masked: assistant turn of a prompt (prompt-completion data trains on the completion only)"
    PROMPT_CUE = "masked: assistant prompt cue (what add_generation_prompt renders)"
    ADDED_EOS = "supervised: end-of-turn appended by the collator"
    IMAGE = "masked: image token"
    PADDING = "masked: padding"
    SYSTEM = "masked: system turn"
    USER = "masked: user turn"
    TEMPLATE = "masked: chat-template text outside any turn"
