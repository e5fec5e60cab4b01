"""Checkpoints that load on their own, and the tools around them. Import from the module that holds a name:

- `processor_files`: the processor files and generation config in every saved directory (`save_processor_files`);
- `repair`: finding checkpoints whose processor does not load alone and repairing them from their base model
  (`scripts/fix_checkpoints.py`);
- `merge`: a LoRA adapter merged into its base model reloaded unquantised (`scripts/merge_adapter.py`);
- `smoke_test`: each model loaded and asked one fixed question about one fixed image (`scripts/check_models.py`).

Saves that are whole or absent, and resuming from them, are `vlm_recipes.resume`.
"""
