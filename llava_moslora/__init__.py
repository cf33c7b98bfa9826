"""llava-moslora: MoSLoRA / QMoSLoRA fine-tuning of LLaVA-1.5."""
