"""The benchmark scripts run on tiny settings and compare like with like (no timing assertions)."""
import keras
import numpy as np


def test_bench_batchnorm_kernel_floor_computes_what_ours_computes(load_script):
    """The floor is only a floor if it does the same training-mode normalization as ours."""
    from keras_varinit.layers import BatchNormalization

    bench = load_script("benchmarks/bench_batchnorm.py")
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(8, 5, 5, 4)).astype("float32")
    floor = bench.KernelFloorBN()
    ours = BatchNormalization(epsilon=1e-3)
    np.testing.assert_allclose(np.asarray(floor(x)), np.asarray(ours(x, training=True)),
                               atol=1e-5)


def test_bench_batchnorm_runs_and_prints_every_ratio(capsys, load_script):
    bench = load_script("benchmarks/bench_batchnorm.py")
    code = bench.main(["--images", "32", "--batch", "16", "--epochs", "1", "--width", "4"])
    assert code == 0
    out = capsys.readouterr().out
    for variant in bench.VARIANTS:
        assert variant in out
    for label in ("ours pooled / keras BN", "ours pooled / no BN", "ours pooled / kernel floor",
                  "per_sample / ours pooled"):
        line = next(line for line in out.splitlines() if line.startswith(label))
        assert float(line[len(label):].split()[0]) > 0


def test_bench_callback_runs_and_prints_both_ratios(capsys, load_script):
    bench = load_script("benchmarks/bench_callback.py")
    assert bench.main(["--images", "256", "--repeats", "1", "--depth", "3", "--norm", "batch"]) == 0
    out = capsys.readouterr().out
    assert "tracked layers: 7;" in out   # 2 x (Conv2D, BatchNormalization, Activation), Dense
    labels = ("train step", "probe log", "none", "logger")
    if keras.backend.backend() == "tensorflow":
        labels += ("eager tape",)   # the floor of an eager log
        assert "floor of two eager logs (2 x eager tape) / 64 train steps, wall: " in out
    for label in labels:
        line = next(line for line in out.splitlines() if line.startswith(label))
        wall, cpu = line[len(label):].split("|")
        assert float(wall.split()[2]) > 0 and float(cpu.split()[2]) > 0    # ratio(min)
    assert "2 logs per fit with the logger" in out   # step 0 and the epoch end
