"""The example scripts run end to end on tiny settings and write what they promise (on the
TensorFlow backend only: they call the package's public API, whose backends are tested by the
other modules)."""
import pytest


def test_finite_width_drift_writes_table_and_plot(tmp_path, capsys, load_script):
    module = load_script("examples/finite_width_drift.py")
    code = module.main(["--depth", "6", "--widths", "2", "4", "--seeds", "2", "--batch", "8",
                        "--out", str(tmp_path)])
    assert code == 0
    table = (tmp_path / "finite_width_drift.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| kaiming_")]
    assert len(rows) == 4   # 2 initializers x 2 widths
    assert (tmp_path / "finite_width_drift.png").read_bytes()[:4] == b"\x89PNG"
    assert "within 4x" in capsys.readouterr().out


def test_finite_width_drift_rejects_bad_arguments(capsys, load_script):
    module = load_script("examples/finite_width_drift.py")
    with pytest.raises(SystemExit):
        module.parse_args(["--seeds", "0"])
    assert "Received: --depth 30 --seeds 0" in capsys.readouterr().err


def test_normalization_batch_size_writes_table_and_plot(tmp_path, capsys, load_script):
    module = load_script("examples/normalization_batch_size.py")
    code = module.main(["--data", "synthetic", "--subset", "16", "--val-subset", "8",
                        "--epochs", "1", "--batch-sizes", "4", "--depth", "3",
                        "--width", "4", "--groups", "2", "--out", str(tmp_path)])
    assert code == 0
    table = (tmp_path / "normalization_batch_size.md").read_text()
    assert "| batch size | batch | group | layer |" in table and "SYNTHETIC" in table
    rows = [line for line in table.splitlines() if line.startswith("| 4 |")]
    assert len(rows) == 3   # validation error, train/test gap, seconds
    assert rows[1].split("|")[3:5] == [" +0.0 ", " +0.0 "]   # GN, LN: the modes agree
    assert "Wall time of the whole script" in table
    assert (tmp_path / "normalization_batch_size.png").read_bytes()[:4] == b"\x89PNG"
    assert "lr 0.00625" in capsys.readouterr().out   # 0.05 x 4 / 32: scaled linearly


@pytest.mark.parametrize("argv, match", [
    (["--methods", "pooled"], "Received: --methods pooled"),
    (["--width", "6", "--groups", "4"], "Received: groups=4. Allowed: 1, 2"),
    (["--methods", "instance", "--batch-sizes", "0"], "Received: --batch-sizes 0"),
    (["--subset", "8", "--batch-sizes", "16"], "Received: --subset 8"),
])
def test_normalization_batch_size_rejects_bad_arguments(argv, match, capsys, load_script):
    module = load_script("examples/normalization_batch_size.py")
    with pytest.raises(SystemExit):
        module.parse_args(argv)
    assert match in capsys.readouterr().err


def test_tanh_saturation_too_large_gradient_grows_towards_the_input(tmp_path, capsys,
                                                                     load_script):
    """N(0, 1) weights saturate the tanh units, yet the gradient is not starved: the large
    weights outweigh the small tanh' and Var[dL/dy] grows towards the input (x12 per layer at
    width 512, about x4 at width 64), as the docstring says; N(0, 0.01^2) vanishes both ways."""
    module = load_script("examples/tanh_saturation.py")
    doc = " ".join(module.__doc__.split())
    assert "signal is starved" not in doc and "explodes towards the input" in doc
    args = module.parse_args(["--data", "synthetic", "--depth", "8", "--width", "64", "--n",
                              "64", "--out", str(tmp_path)])
    x, synthetic = module.load_batch(args)
    results = module.analyse(args, x)
    large, small = results["normal:1.0"], results["normal:0.01"]
    assert min(large["saturated"][1:]) > 0.5
    # between the hidden layers dense_02 .. dense_07 (the first one's 3072 inputs saturate it
    # further, the classifier has 10 outputs): x4 per step at width 64
    grad = large["grad_var"]
    assert all(a > 2 * b for a, b in zip(grad[1:-2], grad[2:-1])), grad
    assert grad[1] / grad[-2] > 100, grad
    assert small["grad_var"][0] / small["grad_var"][-1] < 1e-3


@pytest.mark.real_data
def test_tanh_saturation_readme_figures_are_what_it_prints(cifar10_path, load_script):
    """README's tanh bullet quotes the default run (12 layers, width 512, 512 CIFAR-10 images,
    seed 0): the figures are re-measured here so they cannot drift from the script."""
    import pathlib
    import re

    module = load_script("examples/tanh_saturation.py")
    args = module.parse_args(["--data", str(cifar10_path)])
    x, synthetic = module.load_batch(args)
    assert not synthetic
    r = module.analyse(args, x)
    small, xavier, large = r["normal:0.01"], r["xavier_normal"], r["normal:1.0"]

    def e(value, digits=1):   # 1.5e-7, as the README writes it
        return re.sub(r"e([+-])0*(\d)", lambda m: "e" + m.group(1).replace("+", "") +
                      m.group(2), f"{value:.{digits}e}")

    grad = large["grad_var"]
    sat = [100 * s for s in large["saturated"]]
    figures = [f"from {small['std'][0]:.2g} to {e(small['std'][-1])}",
               f"saturates {sat[0]:.1f}% of units in layer 1",
               f"{min(sat[1:]):.1f}-{max(sat[1:]):.1f}% in layers 2-{len(sat)}",
               f"Xavier keeps {xavier['std'][0]:.2g} to {xavier['std'][-1]:.2g}"]
    readme = " ".join((pathlib.Path(module.__file__).parents[1] / "README.md").read_text()
                      .split())
    bullet = readme[readme.index("**tanh**"):readme.index("**CIFAR-10 statistics**")]
    assert [f for f in figures if f not in bullet] == [], bullet
    # The saturated net's gradient is a product of eleven layer factors of its few unsaturated
    # units: float rounding (TensorFlow with or without oneDNN) moves it by up to 25 %.
    growth = float(re.search(r"grows ([0-9.e+-]+)x from the classifier", bullet).group(1))
    last, first = map(float, re.search(r"Var\[dL/dy\] ([0-9.e+-]+) -> ([0-9.e+-]+)",
                                       bullet).groups())
    assert grad[-1] == pytest.approx(last, rel=0.01)
    assert grad[0] == pytest.approx(first, rel=0.3)
    assert grad[0] / grad[-1] == pytest.approx(growth, rel=0.3)
