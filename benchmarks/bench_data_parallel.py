"""Images per second of `keras-varinit train` with `--distribute data_parallel` (JAX, every
visible device) against one device, the same configuration in the same run.

Each repeat trains both variants in turn (interleaved), each in its own process, and reads the
trainer's own throughput (status.json's images_per_second: the recent training batches, after
compilation); the best of the repeats is reported for each, then their ratio.

    # the GPU measurement (full CIFAR-10, the 30-layer Xavier-vs-Kaiming pair's network):
    KERAS_BACKEND=jax python benchmarks/bench_data_parallel.py --subset 0 --epochs 1 \\
        --batch-size 512 --repeats 5
    # on CPU, two XLA host devices standing in for two accelerators:
    python benchmarks/bench_data_parallel.py --cpu-devices 2 --subset 2048 --depth 6

"One device" pins the process to the first accelerator (CUDA_VISIBLE_DEVICES=0), or to one host
device on CPU; "data parallel" sees them all.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ("one device", "data parallel")


def _env(variant, cpu_devices):
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=str(REPO))
    if cpu_devices:
        count = 1 if variant == "one device" else cpu_devices
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
        env["JAX_PLATFORMS"] = "cpu"
    elif variant == "one device":
        env["CUDA_VISIBLE_DEVICES"] = "0"
    return env


def train_once(variant, args, run_dir):
    """One run of ``variant``; its images per second (status.json)."""
    argv = [sys.executable, "-m", "keras_varinit.cli", "train", "--depth", str(args.depth),
            "--init", args.init, "--subset", str(args.subset), "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--data", args.data, "--stats-every", "0",
            "--backup-every", "0", "--quiet", "--log-dir", str(run_dir)]
    if variant == "data parallel":
        argv += ["--distribute", "data_parallel"]
    proc = subprocess.run(argv, cwd=REPO, env=_env(variant, args.cpu_devices),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
    status = json.loads((run_dir / "status.json").read_text())
    return float(status["images_per_second"]), status["device"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=30)
    parser.add_argument("--init", default="kaiming_normal")
    parser.add_argument("--subset", type=int, default=0, help="training images (0 = all)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--data", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu-devices", type=int, default=0,
                        help="use this many XLA host devices instead of accelerators")
    args = parser.parse_args(argv)
    best = {variant: 0.0 for variant in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for variant in VARIANTS:  # interleaved: both see the same machine load
                run_dir = pathlib.Path(tmp) / f"{repeat}-{variant.replace(' ', '_')}"
                speed, device = train_once(variant, args, run_dir)
                best[variant] = max(best[variant], speed)
                print(f"repeat {repeat + 1}: {variant:14s} {speed:10.0f} images/s on {device}",
                      flush=True)
    for variant in VARIANTS:
        print(f"{variant:14s} best {best[variant]:10.0f} images/s")
    print(f"data parallel / one device  {best['data parallel'] / best['one device']:.3f}x "
          "(images per second)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
