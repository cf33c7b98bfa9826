"""`llava-moslora ablate`: every adapter variant x seed, trained, evaluated and compared to LoRA."""
