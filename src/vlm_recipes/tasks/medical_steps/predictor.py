"""The inference API of medical_steps: a trained model answering a procedure's steps, prompted as in training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .format import next_memory, parse_step_context, parse_step_output
from .task import MedicalStepsTask, generate_step_answers, step_prompt_row

__all__ = ["MedicalStepsPredictor", "load_predictor"]


class MedicalStepsPredictor:
    """Answers steps of a procedure with a trained model, prompting exactly as in training.

    Args:
        model, processor: as returned by `vlm_recipes.generation.load_for_generation`.
        generation: keywords of `generate_answers` (`max_new_tokens` defaults to 256 here: outputs are JSON objects).
    """

    def __init__(self, model, processor, **generation: Any):
        self.model, self.processor = model, processor
        self.task = MedicalStepsTask()
        self.generation = {"max_new_tokens": 256, **generation}

    def _answer(self, image: Any, user_goal: str, short_term: dict[str, Any], long_term: dict[str, Any]) -> str:
        prompt_row = step_prompt_row(image, user_goal, short_term, long_term)
        (text,) = generate_step_answers(self.model, self.processor, self.task, [prompt_row], **self.generation)
        return text

    @staticmethod
    def _as_result(text: str) -> dict[str, Any]:
        output, error = parse_step_output(text)
        return output if output is not None else {"_raw": text, "_error": error}

    def predict_step(
        self,
        image_path: str | Path | Any,
        user_goal: str,
        short_term_memory: dict[str, Any] | None = None,
        long_term_memory: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The step's output as a dict; an unparseable answer gives `{"_raw": answer, "_error": why}`.

        `image_path` may also be a PIL image; a memory left `None` is empty (as at a task's first step).
        """
        text = self._answer(image_path, user_goal, short_term_memory or {}, long_term_memory or {})
        return self._as_result(text)

    def run_task(self, steps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answer a task's steps in order, each prompted with the memory of this run's own earlier answers.

        `steps`: dicts `{"image_path", "user_goal"}`, or rows of `load_rows` / a dataset (their first image, and their
        `user_goal` or the goal in their prompt). Returns one `predict_step`-style dict per step; an unparseable
        answer is remembered as nothing (see `next_memory`).
        """
        short_term: dict[str, Any] = {}
        long_term: dict[str, Any] = {}
        results = []
        for number, step in enumerate(steps):
            if "image_path" in step:
                image = step["image_path"]
            elif step.get("images"):
                image = step["images"][0]
            else:
                raise ValueError(f"Step {number} has neither `image_path` nor `images`.")
            user_goal = step.get("user_goal") or (step.get("messages") and parse_step_context(step["messages"])[0])
            if not user_goal:
                raise ValueError(f"Step {number} has neither `user_goal` nor a medical_steps prompt in `messages`.")
            text = self._answer(image, user_goal, short_term, long_term)
            results.append(self._as_result(text))
            short_term, long_term = next_memory(long_term, parse_step_output(text)[0])
        return results


def load_predictor(
    model_path: str | Path, base_model_name: str | None = None, trust_remote_code: bool = False, **generation: Any
) -> MedicalStepsPredictor:
    """A `MedicalStepsPredictor` for a trained model directory or LoRA adapter (on `base_model_name`, or the base in
    its `adapter_config.json`)."""
    from ...generation import load_for_generation

    model, processor = load_for_generation(model_path, base_model_name, trust_remote_code)
    return MedicalStepsPredictor(model, processor, **generation)
