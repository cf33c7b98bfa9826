"""Data: the synthetic offline LLaVA instruction set (`synthetic`), the pre-flight data check
(`check`, behind `llava-moslora check-data`) and the checked XTuner dataset (`dataset`)."""
