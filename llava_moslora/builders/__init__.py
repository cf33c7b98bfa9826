"""LLaVA assembly helpers XTuner does not ship, and tiny models for the offline default and tests."""
