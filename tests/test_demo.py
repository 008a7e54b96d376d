"""symgrad demo, in a few epochs: generated layers learn the digits, and the plots and results are written."""
import io
import json
import sys

import numpy as np

from codegen.cli import main
from codegen.demo import SETUPS, Config, Progress, gradient_factors, load_digits_split, mlp, train

EPOCHS = 3


def test_a_short_demo_learns_the_digits_and_writes_the_plots_and_results(tmp_path, capsys):
    assert main(["demo", "--epochs", str(EPOCHS), "--out", str(tmp_path)]) == 0
    for name in ("loss_curves.png", "gradient_factor.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG"), name
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert list(results) == [setup.name for setup in SETUPS]
    # chance is 0.1
    assert results["softmax_ce"]["test_accuracy"] >= 0.9
    # seed 004: with sigmoid outputs, the same weights and steps, MSE learns slower than cross-entropy
    assert results["sigmoid_mse"]["test_accuracy"] < results["sigmoid_bce"]["test_accuracy"] - 0.2
    assert all(len(result["history"]["train_loss"]) == EPOCHS + 1 for result in results.values())
    out, err = capsys.readouterr()
    assert "softmax + cross-entropy" in out and "results.json written" in out
    # not a terminal: one progress line an epoch, no redraws
    assert len(err.splitlines()) == EPOCHS * len(SETUPS) and "\r" not in err


def test_the_three_networks_start_from_the_same_weights():
    first, *others = [mlp(setup, Config()).parameters() for setup in SETUPS]
    for params in others:
        for (layer, name), (first_layer, _) in zip(params, first):
            np.testing.assert_array_equal(getattr(layer, name), getattr(first_layer, name))


def test_training_is_deterministic():
    data, config = load_digits_split(0), Config(epochs=1)
    runs = [train(SETUPS[0], data, config, Progress(io.StringIO()))["history"] for _ in range(2)]
    assert runs[0] == runs[1]


def test_the_gradient_factors_from_the_kernels_are_the_seeds_formulas():
    a, mse, ce = gradient_factors()
    assert a.min() < 0.01 and a.max() > 0.99
    np.testing.assert_allclose(mse, (1 - a) * a * (1 - a), rtol=1e-12)
    np.testing.assert_allclose(ce, 1 - a, rtol=1e-9)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_progress_bar_redraws_in_place_on_a_terminal():
    stream = Terminal()
    for done in (1, 2):
        Progress(stream).update("epoch 1/1", done, 2, 0.5, 0.25)
    assert stream.getvalue() == ("\repoch 1/1 [############            ] 1/2 loss 0.5000 acc 0.250"
                                 "\repoch 1/1 [########################] 2/2 loss 0.5000 acc 0.250\n")


def test_without_the_demo_extra_the_command_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert main(["demo"]) == 2
    assert "pip install 'symgrad[demo]'" in capsys.readouterr().err
