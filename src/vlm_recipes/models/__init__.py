"""The model of a run: loading it and deciding about its parts. Import from the module that holds a name:

- `loading`: whether the model can be loaded (`check_model_available`), `load_processor`, `load_model`;
- `checks`: early checks of the model keys and training arguments, the ZeRO stage and the training dtype;
- `quantization`: the bitsandbytes config and what a quantised model needs after loading;
- `lora`: LoRA targets per part (`peft_config_for`);
- `parts`: frozen parts, per-part learning rates, parameter counts.
"""
