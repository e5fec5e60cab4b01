"""Generation with a trained model: loading it (a full model, or a LoRA adapter on its base as it trained) and
answering prompts in batches. Used by evaluation (`vlm_recipes.evaluation`), the tasks whose answers feed the next
prompt (`Task.predict`), and the tools.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .chat_templates import fill_missing_chat_template
from .collator import normalize_messages, special_tokens_kwargs
from .families import model_class_for

__all__ = ["adapter_base", "base_precision", "generate_answers", "load_for_generation"]


def adapter_base(model_path: str | Path) -> str | None:
    """The base model named by a LoRA adapter directory's `adapter_config.json`, or None for a full model."""
    config = Path(model_path) / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text())["base_model_name_or_path"]


def base_precision(model_args) -> str:
    """How a run's base model was loaded, in words: `4-bit nf4`, `8-bit` or `unquantised`."""
    if getattr(model_args, "load_in_4bit", False):
        return f"4-bit {getattr(model_args, 'bnb_4bit_quant_type', 'nf4')}"
    return "8-bit" if getattr(model_args, "load_in_8bit", False) else "unquantised"


def load_for_generation(
    model_path: str | Path,
    base_model: str | None = None,
    trust_remote_code: bool = False,
    quantized_as=None,
):
    """Load `(model, processor)` from a full model directory, or a LoRA adapter directory on its base model.

    The base model of an adapter is read from its `adapter_config.json` unless `base_model` is given. The processor
    comes from the directory itself when it holds processor files (our outputs always do), else from the base.
    `quantized_as=(model_args, training_args)` loads an adapter's base as that run loaded it (4-bit or 8-bit, through
    `models.loading.load_model`), so that the adapter is evaluated on the base it trained on (`eval_after_train`
    evaluates the model in memory, on that base); without it the base is loaded unquantised, as `merge_adapter` merges
    it.
    """
    from transformers import AutoProcessor

    model_path = Path(model_path)
    if not model_path.exists():
        raise FileNotFoundError(f"Model path {model_path} not found.")
    if adapter_base(model_path) is not None:
        from peft import PeftModel

        base = base_model or adapter_base(model_path)
        if quantized_as is not None and base_precision(quantized_as[0]) != "unquantised":
            from dataclasses import replace

            from .models.loading import load_model

            model_args, training_args = quantized_as
            model = load_model(replace(model_args, model_name_or_path=base), training_args)
            # In the adapter's saved dtype (bfloat16 for QLoRA, as TRL trains it), not PEFT's float32 upcast.
            model = PeftModel.from_pretrained(model, model_path, autocast_adapter_dtype=False)
        else:
            model = model_class_for(base).from_pretrained(base, trust_remote_code=trust_remote_code)
            model = PeftModel.from_pretrained(model, model_path)
        has_processor = any(
            (model_path / name).is_file() for name in ("processor_config.json", "tokenizer_config.json")
        )
        processor = AutoProcessor.from_pretrained(
            model_path if has_processor else base, trust_remote_code=trust_remote_code
        )
    else:
        model = model_class_for(model_path).from_pretrained(model_path, trust_remote_code=trust_remote_code)
        processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    # Florence-2's processor drops a saved chat template on reload; PaliGemma ships none.
    fill_missing_chat_template(processor)
    model.eval()
    return model, processor


@torch.no_grad()
def generate_answers(
    model,
    processor,
    task: Any,  # a `vlm_recipes.tasks.Task`: its `prompt_messages(row)` are answered
    rows: list[dict[str, Any]],
    batch_size: int = 8,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    do_sample: bool = False,
) -> list[str]:
    """Batched generation with left padding (so every prompt ends where its answer starts); greedy by default."""
    from tqdm.auto import tqdm

    answers = []
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(rows), batch_size), desc="Generating", leave=False):
        batch_rows = rows[start : start + batch_size]
        texts = [
            processor.apply_chat_template(normalize_messages(task.prompt_messages(row)), add_generation_prompt=True)
            for row in batch_rows
        ]
        images = [list(row.get("images") or []) for row in batch_rows]
        inputs = processor(
            text=texts,
            images=images if any(images) else None,
            padding=True,
            padding_side="left",
            return_tensors="pt",
            **special_tokens_kwargs(processor.tokenizer, texts),
        ).to(device)
        sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, pad_token_id=processor.tokenizer.pad_token_id, **sampling
        )
        # A decoder-only model returns prompt + answer; an encoder-decoder (Florence-2) returns the answer only.
        is_encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
        new_tokens = output if is_encoder_decoder else output[:, inputs["input_ids"].shape[1] :]
        answers.extend(processor.batch_decode(new_tokens, skip_special_tokens=True))
    return answers
