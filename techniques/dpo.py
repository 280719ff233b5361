"""Direct Preference Optimization (TRL `DPOTrainer`) on LoRA, QLoRA and full models.

Not implemented yet: see the issue "DPO via TRL: LoRA and full, loss variants, preference data in
every template".
"""
