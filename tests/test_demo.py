"""`llava-moslora demo` (the one-minute adapter demo of docs/adapter.md), run through the CLI at a
smaller size: both adapters learn, merge exactly, and the MoSLoRA mixer moves."""

import pytest

from llava_moslora import demo
from llava_moslora.cli import main


def test_demo_command_both_adapters_learn_and_merge_exactly(capsys, monkeypatch):
    results = []

    def recorded(**kwargs):
        results.extend(run_demo(**kwargs))
        return results

    run_demo = demo.run_demo
    monkeypatch.setattr(demo, "run_demo", recorded)  # the CLI imports it at call time
    assert main(["demo", "--steps", "40", "--lr", "1e-2"]) == 0
    lora, mos = results
    for res in (lora, mos):
        assert res.losses[-1] < res.losses[0] - 0.5, res.losses
        assert res.accuracy > 0.2  # the base model is at chance (1/64)
        assert res.merge_error < 1e-4
    assert lora.mixer_drift is None and mos.mixer_drift > 0.05  # the mixer learned
    assert mos.trainable - lora.trainable == 2 * 7 * 8 * 8  # one r x r mixer per adapted layer
    out = capsys.readouterr().out
    assert "MoSLoRA (kaiming mixer)" in out and "held-out acc" in out


def test_cli_requires_a_command():
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
