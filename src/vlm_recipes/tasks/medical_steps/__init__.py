"""The medical_steps task: medical software procedures, one step at a time, with memory.

Modules: `native` (reading `steps.csv`), `splits` (task-level splits), `format` (prompt, memory and output JSON),
`metrics`, `demo_data` (synthetic procedures), `task` (the registered `MedicalStepsTask`) and `predictor` (the
inference API: `load_predictor`, `MedicalStepsPredictor`).
"""

# The inference API is public at the package level: `from vlm_recipes.tasks.medical_steps import load_predictor`.
from .predictor import MedicalStepsPredictor, load_predictor
from .task import MedicalStepsTask

__all__ = ["MedicalStepsPredictor", "MedicalStepsTask", "load_predictor"]
