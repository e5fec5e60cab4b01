"""Timing a trainer's steps (`StepRecorder`) and running training paths in threads that take turns (`take_turns`).

A part times `scripts/sft.py`'s own `main` by passing `on_trainer=partial(record_steps, recorders)`: `main` calls it
once the trainer is built, and the recorder attaches to that trainer.
"""

from __future__ import annotations

import contextlib
import threading
import time
from functools import partial
from typing import Any

from vlm_recipes._compat import run_before_training_step


class StepRecorder:
    """Wall time at the end of each optimizer step, and what each micro-batch held (counted in `training_step`)."""

    def __init__(self, trainer, vision_patches: bool = False, hand_over=None):
        from transformers import TrainerCallback

        recorder = self
        self.step_ends: list[float] = []
        # When each step's thread got the turn back (`TakingTurns`); without turns, right after the step's end.
        self.resumed: list[float] = []
        self.hand_overs = 0
        self.batches: list[dict[str, int]] = []
        self.args = trainer.args
        self.synchronize = trainer.args.device.type == "cuda"
        # The vision tower's FLOPs factor for MFU: 6 when it trains, 2 when it is frozen, since `VLMSFTTrainer` then
        # runs it forward only (`detach_frozen_vision_inputs`).
        self.vision_flops_factor = None
        if vision_patches:
            from vlm_recipes.trainer import part_has_trainable

            self.vision_flops_factor = 6 if part_has_trainable(trainer.model, "vision") else 2

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if recorder.synchronize:
                    import torch

                    torch.cuda.synchronize()
                recorder.step_ends.append(time.perf_counter())
                if hand_over is not None:
                    recorder.hand_overs += 1
                    hand_over()
                recorder.resumed.append(time.perf_counter())

        trainer.add_callback(_Callback())

        def record_batch(inputs):
            mask = inputs["attention_mask"]
            record = {"samples": int(mask.shape[0]), "tokens": int(mask.sum()), "positions": int(mask.numel())}
            if vision_patches and "image_grid_thw" in inputs:
                record["patches"] = int(inputs["image_grid_thw"].prod(dim=-1).sum())
            recorder.batches.append(record)

        # The same hook the compute report uses (the library's one touch of `training_step`).
        run_before_training_step(trainer, record_batch)

    def rates(self, warmup: int) -> dict[str, float]:
        """Samples/s, tokens/s and padding of the steps after `warmup` (one micro-batch per step)."""
        if len(self.step_ends) <= warmup or warmup < 1:
            raise RuntimeError(f"Need more than {warmup} recorded steps (warm-up >= 1), got {len(self.step_ends)}.")
        # A step's time runs from when its thread resumed after the step before to the step's end: the batch's loading
        # and collation, forward, backward and optimizer step, and the trainer's work between steps.
        elapsed = sum(self.step_ends[i] - self.resumed[i - 1] for i in range(warmup, len(self.step_ends)))
        timed = self.batches[warmup : len(self.step_ends)]
        totals = {key: sum(batch.get(key, 0) for batch in timed) for key in ("samples", "tokens", "positions")}
        rates = {
            "steps": len(timed),
            "hand_overs": self.hand_overs,
            "seconds": elapsed,
            "samples_per_second": totals["samples"] / elapsed,
            "tokens_per_second": totals["tokens"] / elapsed,
            "padding_fraction": 1 - totals["tokens"] / totals["positions"],
        }
        if any("patches" in batch for batch in timed):
            rates["patches_per_second"] = sum(batch.get("patches", 0) for batch in timed) / elapsed
        return rates


def record_steps(recorders: list[StepRecorder], trainer, vision_patches: bool = False, hand_over=None) -> None:
    """An `on_trainer` hook for `vlm_recipes.sft.main`: attach a `StepRecorder` to its trainer, kept in `recorders`."""
    recorders.append(StepRecorder(trainer, vision_patches=vision_patches, hand_over=hand_over))


class TakingTurns:
    """Threads that run one at a time, in a fixed rotation: the holder of the turn runs, the others wait.

    Part 2 times training paths against each other on a shared machine whose load changes from one second to the
    next. Timed one after the other, a run that falls in a slow spell is compared with one that does not: single runs
    of the same path differ by up to 40%, in a fast and a slow mode. Taking turns at every optimizer step puts the
    paths' steps in the same spells, and since only one thread runs at a time, they do not compete for the cores.
    (Dataloader worker processes would fill their prefetch queues while their run waits; part 2 has none, as its demo
    recipe sets `dataloader_num_workers: 0`.)
    """

    def __init__(self, names: list[str]):
        self._condition = threading.Condition()
        self._active = list(names)
        self._current = self._active[0] if self._active else None

    def wait(self, name: str) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._current == name)

    def hand_over(self, name: str) -> None:
        """Give the turn to the next thread in the rotation, and wait until it comes back."""
        with self._condition:
            if self._current != name:
                raise RuntimeError(f"{name!r} handed over a turn it did not hold (held by {self._current!r}).")
            self._current = self._active[(self._active.index(name) + 1) % len(self._active)]
            self._condition.notify_all()
            self._condition.wait_for(lambda: self._current == name)

    def leave(self, name: str) -> None:
        with self._condition:
            position = self._active.index(name)
            self._active.remove(name)
            if self._current == name:
                self._current = self._active[position % len(self._active)] if self._active else None
            self._condition.notify_all()


def take_turns(functions: dict[str, Any]) -> dict[str, Any]:
    """Run each `function(hand_over)` in its own thread, taking turns (`TakingTurns`) in the order given: a function
    runs until it calls `hand_over()`, and runs on when its turn comes back. Returns each function's result; the
    first error raised in any of them is raised here, after every thread has ended."""
    turns = TakingTurns(list(functions))
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def run(name: str, function) -> None:
        try:
            turns.wait(name)
            results[name] = function(partial(turns.hand_over, name))
        except BaseException as error:  # noqa: BLE001 (raised again in the calling thread, below)
            errors.append(error)
        finally:
            turns.leave(name)

    # Daemon threads: an interrupt (Ctrl-C) in the calling thread ends the process instead of waiting for the runs.
    threads = [
        threading.Thread(target=run, args=item, name=f"turn-{item[0]}", daemon=True) for item in functions.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@contextlib.contextmanager
def torch_threads(count: int):
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
