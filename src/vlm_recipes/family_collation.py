"""The family-specific parts of `VisionChatCollator`, each called from one hook in `vlm_recipes.collator`.

Prompt/answer families (`ModelFamily.layout` other than `causal`) do not read one rendered conversation:

- PaliGemma (`prefix_suffix`) is a prefix-LM. Its processor takes the prompt as `text` and the answer as `suffix`,
  builds `<image>... <bos> prompt \\n answer <eos>` and marks the answer with `token_type_ids` = 1. The model attends
  bidirectionally over the prompt (type 0) and causally over the answer, so rendering prompt and answer as one
  text would let the answer tokens see each other's future. Labels: the answer and its `<eos>`.
- Florence-2 (`encoder_decoder`) reads `<image>... <s> prompt </s>` in its encoder and writes `<s> answer </s>` with
  its decoder. `input_ids` are the encoder's, `labels` the decoder's targets, and `decoder_input_ids` those targets
  shifted right behind the decoder start token. TRL's `SFTTrainer` computes the loss with a fused LM head that
  shifts `labels` by one as for a causal model unless the batch holds `shift_labels`; for an encoder-decoder the
  labels are already aligned with the decoder positions, so the batch holds `shift_labels` = `labels`.

Both take one prompt and one answer: a sample is a system/user prompt and a final (only) assistant turn. The prompt
is rendered by the processor's chat template (`vlm_recipes.chat_templates` gives these families theirs).

Idefics2's processor (transformers 5.23) keeps a legacy `__call__` that does not report where it expanded the image
placeholders (`text_replacement_offsets`); `legacy_replacement_offsets` computes them (and checks the result against
the processor's own tokens), so that assistant spans map onto the right tokens.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch

from .constants import IGNORE_INDEX, LabelReason
from .data.rows import row_name
from .families import family_of_processor

logger = logging.getLogger(__name__)

__all__ = ["PromptAnswerEncoder", "PromptAnswerRow", "legacy_replacement_offsets"]

PROMPT_REASON = "masked: prompt (what the model reads)"
ENCODER_REASON = "masked: encoder input (the prompt)"
DECODER_REASON = "supervised: decoder target (the answer)"


@dataclass
class PromptAnswerRow:
    """One sample of a prompt/answer family: the rendered prompt, the answer text and the images."""

    name: str
    prompt: str
    answer: str
    images: list[Any]


def _decoder_start_token_id(tokenizer) -> int:
    # BART convention, kept by every Florence-2 checkpoint (`decoder_start_token_id` = `eos_token_id` = 2): the
    # processor cannot tell us the model's value, and the tiny model is built with the same convention.
    return tokenizer.eos_token_id


class PromptAnswerEncoder:
    """The prompt/answer path of a `VisionChatCollator` (PaliGemma, Florence-2), which the collator owns and calls
    from `encode`, `sample_length` and `explain`. It uses the collator's public checks (`validate_example`,
    `render_messages`, `check_lengths`, `drop_too_long`), so the `max_length` / `too_long` policy is the same."""

    def __init__(self, collator):
        self.collator = collator
        self.layout = family_of_processor(collator.processor).layout

    def row(self, example: dict[str, Any], index: int) -> PromptAnswerRow:
        name = row_name(example, index)
        messages, images = self.collator.validate_example(example, name)
        family = family_of_processor(self.collator.processor)
        assistant_turns = [turn for turn, message in enumerate(messages) if message["role"] == "assistant"]
        if assistant_turns != [len(messages) - 1]:
            raise ValueError(
                f"{name}: {family.name} takes one prompt and one answer, so a sample must end with its only assistant "
                f"turn; this one has {len(assistant_turns)} assistant turn(s) among {len(messages)} messages. Split "
                "multi-turn conversations into one sample per answer."
            )
        if family.layout == "encoder_decoder" and len(images) != 1:
            raise ValueError(f"{name}: {family.name} reads exactly one image per sample, got {len(images)}.")
        if family.layout == "prefix_suffix" and not images:
            raise ValueError(
                f"{name}: {family.name} needs at least one image per sample (its processor refuses text only)."
            )
        prompt = self.collator.render_messages(messages[:-1], add_generation_prompt=True)
        answer = "".join(item["text"] for item in messages[-1]["content"])
        return PromptAnswerRow(name=name, prompt=prompt, answer=answer, images=images)

    def process(self, rows: list[PromptAnswerRow]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Tensors of a batch, and a mask whose row sums are the sample lengths (prompt + answer tokens)."""
        from transformers import BatchFeature

        processor, tokenizer = self.collator.processor, self.collator.tokenizer
        padding = {"padding": True, "padding_side": "right", "return_tensors": "pt"}
        if self.collator.pad_to_multiple_of is not None:
            padding["pad_to_multiple_of"] = self.collator.pad_to_multiple_of
        prompts, answers, images = (
            [row.prompt for row in rows],
            [row.answer for row in rows],
            [row.images for row in rows],
        )
        if self.layout == "prefix_suffix":
            # Tensors are made here: the processor's backward-compatible labels would go through NumPy with a warning.
            encoded = processor(text=prompts, images=images, suffix=answers, **{**padding, "return_tensors": None})
            batch = dict(BatchFeature(dict(encoded), tensor_type="pt"))
            # The processor also returns labels (kept there for backward compatibility); ours are built from the same
            # `token_type_ids`, explicitly excluding padding.
            batch.pop("labels", None)
            answer_tokens = (batch["token_type_ids"] == 1) & batch["attention_mask"].bool()
            batch["labels"] = batch["input_ids"].masked_fill(~answer_tokens, IGNORE_INDEX)
            return batch, batch["attention_mask"]
        batch = dict(processor(text=prompts, images=[row_images[0] for row_images in images], **padding))
        targets = tokenizer(
            [tokenizer.bos_token + answer + tokenizer.eos_token for answer in answers],
            add_special_tokens=False,
            **padding,
        )
        labels = targets["input_ids"].masked_fill(targets["attention_mask"] == 0, IGNORE_INDEX)
        decoder_input_ids = torch.full_like(labels, tokenizer.pad_token_id)
        decoder_input_ids[:, 0] = _decoder_start_token_id(tokenizer)
        decoder_input_ids[:, 1:] = targets["input_ids"][:, :-1]
        batch.update(labels=labels, shift_labels=labels, decoder_input_ids=decoder_input_ids)
        return batch, torch.cat([batch["attention_mask"], targets["attention_mask"]], dim=1)

    def encode(self, examples) -> tuple[dict[str, torch.Tensor], list[PromptAnswerRow]]:
        """`VisionChatCollator.encode` for prompt/answer families; the same `max_length` / `too_long` policy."""
        rows = [self.row(example, index) for index, example in enumerate(examples)]
        batch, length_mask = self.process(rows)
        # `check_lengths` sums an attention mask per row: here the prompt's and the answer's together.
        too_long = self.collator.check_lengths(rows, {"attention_mask": length_mask})
        if too_long:
            rows = self.collator.drop_too_long(rows, too_long)
            batch, _ = self.process(rows)
        return batch, rows

    def sample_length(self, example: dict[str, Any], index: int = 0) -> int:
        """Tokens of one sample: prompt (image tokens included) plus answer, encoder and decoder together."""
        _, length_mask = self.process([self.row(example, index)])
        return int(length_mask.sum())

    def explain(self, example: dict[str, Any]) -> list[tuple[int, str, int, str]]:
        """`VisionChatCollator.explain` for prompt/answer families: Florence-2's encoder tokens, then its decoder's."""
        rows = [self.row(example, 0)]
        batch, _ = self.process(rows)
        image_token_id = self.collator.tokenizer.convert_tokens_to_ids(self.collator.processor.image_token)
        input_ids = batch["input_ids"][0].tolist()
        tokens = self.collator.tokenizer.convert_ids_to_tokens(input_ids)
        explained = []
        if self.layout == "prefix_suffix":
            for token_id, token, label in zip(input_ids, tokens, batch["labels"][0].tolist()):
                if label != IGNORE_INDEX:
                    reason = LabelReason.ASSISTANT
                else:
                    reason = LabelReason.IMAGE if token_id == image_token_id else PROMPT_REASON
                explained.append((token_id, token, label, reason))
            return explained
        for token_id, token in zip(input_ids, tokens):
            explained.append(
                (token_id, token, IGNORE_INDEX, LabelReason.IMAGE if token_id == image_token_id else ENCODER_REASON)
            )
        labels = batch["labels"][0].tolist()
        for token_id, token in zip(labels, self.collator.tokenizer.convert_ids_to_tokens(labels)):
            explained.append((token_id, token, token_id, DECODER_REASON))
        return explained


# ---------------------------------------------------------------------------------------------------------------------
# Idefics2: image-placeholder offsets that its legacy processor does not report
# ---------------------------------------------------------------------------------------------------------------------
def _idefics2_replacements(processor, text: str) -> tuple[str, list[dict[str, Any]]]:
    """Expand Idefics2's image placeholders as `Idefics2Processor.__call__` does, with the offsets of each.

    Each `<image>` becomes `<fake_token_around_image>` + `<image>` x `image_seq_len` + `<fake_token_around_image>`
    (x 5 with image splitting), adjacent images share one boundary token, and a space is inserted after a closing
    boundary token that a word follows directly.
    """
    fake, image = processor.fake_image_token, processor.image_token
    one_image = f"{fake}{image * processor.image_seq_len}{fake}"
    if processor.image_processor.do_image_splitting:
        one_image *= 5
    one_image = one_image.replace(fake + fake, fake)
    pieces, replacements, cursor, expanded_length = [], [], 0, 0
    for match in re.finditer(re.escape(image), text):
        before = text[cursor : match.start()]
        pieces.append(before)
        expanded_length += len(before)
        replacement = one_image
        if pieces and "".join(pieces).endswith(fake):  # follows another image directly: one boundary token
            replacement = replacement[len(fake) :]
        following = text[match.end() : match.end() + 1]
        if following and not following.isspace() and following != "<":
            replacement += " "
        replacements.append(
            {
                "type": "image",
                "span": (match.start(), match.end()),
                "new_span": (expanded_length, expanded_length + len(replacement)),
                "text": image,
                "replacement": replacement,
            }
        )
        pieces.append(replacement)
        expanded_length += len(replacement)
        cursor = match.end()
    pieces.append(text[cursor:])
    return "".join(pieces), replacements


def legacy_replacement_offsets(processor, texts: list[str], encoded: dict[str, Any], tokenizer_kwargs: dict):
    """`text_replacement_offsets` for a processor that does not report them (Idefics2), checked against its tokens.

    Raises:
        ValueError: the processor is not one we can compute them for and the texts hold image placeholders, or the
            computed expansion does not reproduce the processor's tokens.
    """
    image_token = getattr(processor, "image_token", None)
    if image_token is None or not any(image_token in text for text in texts):
        return [[] for _ in texts]
    family = family_of_processor(processor)
    if family is None or family.name != "idefics2":
        raise ValueError(
            f"{type(processor).__name__} does not report where it expanded the image placeholders "
            "(`return_text_replacement_offsets`), so assistant turns cannot be located among its tokens. "
            "Compute them in `vlm_recipes.family_collation.legacy_replacement_offsets`."
        )
    expanded, replacements = zip(*(_idefics2_replacements(processor, text) for text in texts))
    check = processor.tokenizer(list(expanded), **tokenizer_kwargs)["input_ids"]
    for row, ids in enumerate(check):
        if list(ids) != list(encoded["input_ids"][row][: len(ids)]):
            raise ValueError(
                f"Our expansion of Idefics2's image placeholders does not reproduce {type(processor).__name__}'s "
                "tokens (has the processor changed?); update `vlm_recipes.family_collation._idefics2_replacements`."
            )
    return list(replacements)
