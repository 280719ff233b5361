"""Fine-tuning techniques: each module turns settings and a base model into a trainable model."""
