"""Evaluation with VLMEvalKit: a model class for our exports, the paper's 9-benchmark suite and an
offline tiny suite, the Table 5 report and the Figure 5 MMBench radar.

Modules import VLMEvalKit lazily (importing it takes tens of seconds): `benchmarks`, `manifest`,
`report` and `tiny_bench` never import it, `model`, `runner` and `offline` do when used.
"""
