"""The README's main command (`llava-moslora demo`) at a smaller size."""

from llava_moslora.cli import main
from llava_moslora.demo import run_demo


def test_demo_both_adapters_learn_and_merge_exactly(capsys):
    lora, mos = run_demo(steps=40, lr=1e-2)
    for res in (lora, mos):
        assert res.losses[-1] < res.losses[0] - 0.5, res.losses
        assert res.accuracy > 0.2  # the base model is at chance (1/64)
        assert res.merge_error < 1e-4
    assert lora.mixer_drift is None and mos.mixer_drift > 0.05  # the mixer learned
    assert mos.trainable - lora.trainable == 2 * 7 * 8 * 8  # one r x r mixer per adapted layer
    out = capsys.readouterr().out
    assert "MoSLoRA (kaiming mixer)" in out and "held-out acc" in out


def test_cli_requires_a_command(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
