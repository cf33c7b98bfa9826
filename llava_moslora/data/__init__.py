"""Data helpers: the synthetic offline LLaVA instruction set (`synthetic`)."""
