"""Data: the offline tasks' pictures (`drawing`), LLaVA-1.5's prompt layouts (`prompts`), held-out
items and their VLMEvalKit TSV (`items`), the shapes task (`synthetic`), the compositional task
(`compositional`), the pre-flight data check (`check`, behind `llava-moslora check-data`) and the
checked XTuner dataset (`dataset`)."""
