"""The medical_steps task: medical software procedures, one step at a time, with memory.

Modules: `native` (reading `steps.csv`), `splits` (task-level splits), `format` (prompt, memory and output JSON),
`metrics`, `demo_data` (synthetic procedures), `task` (the registered `MedicalStepsTask`) and `predictor` (the
inference API: `load_predictor`, `MedicalStepsPredictor`).
"""

from .task import MedicalStepsTask

__all__ = ["MedicalStepsTask"]
