"""Full fine-tuning with layer-wise learning-rate decay and differential LR groups.

Not implemented yet: see the issue "Full fine-tune with layer-wise LR decay and differential LR
groups". The LoRA / QLoRA recipes in `techniques.lora` and `techniques.qlora` are ready.
"""
