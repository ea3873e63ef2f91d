"""End-to-end fine-tuning of converted models: distillation from the dense teacher on the HF Trainer."""
