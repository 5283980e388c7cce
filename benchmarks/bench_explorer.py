"""Explorer responsiveness, measured (python benchmarks/bench_explorer.py [--quick]).

1. The "At initialization" render path for a 30-layer CNN: what the page does on a cache miss
   (build the network, LSUV if chosen, one forward/backward pass for the variance profile,
   activation samples, then the Altair charts), after one warm-up profile of another
   configuration (TensorFlow's first trace). Goal: under 3 s. Also the page-level number:
   a Streamlit AppTest rerun after changing the initializer (the whole script, profile
   included).
2. Training throughput: images/s of the same `keras-varinit train` run (same config, same
   data) launched (a) from the command line and (b) through the explorer's JobManager while a
   poller does what the page's fragment does every 1.5 s (read the run store, build the
   charts). Images/s = training images of epochs 2.. / their seconds in metrics.csv (epoch 1
   includes tracing). Runs alternate CLI, explorer, CLI, explorer; ratio = explorer / CLI.
   Goal: >= 0.9.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from explorer import charts, presets  # noqa: E402
from explorer.run_store import RunStore  # noqa: E402
from explorer.worker import JobManager, detect_devices  # noqa: E402


def bench_profile(repeats: int):
    from explorer.profile import compute_profile

    base = dict(presets.DEFAULTS, depth=30, data=os.environ.get("BENCH_DATA", "synthetic"))
    t = time.perf_counter()
    compute_profile(dict(base, depth=29, init="torch_default"), hist_layers="all")
    warm = time.perf_counter() - t
    results = {}
    for init in ("xavier_normal", "kaiming_normal", "lsuv"):
        times = []
        for seed in range(repeats):
            t = time.perf_counter()
            p = compute_profile(dict(base, init=init, seed=seed + 1), hist_layers="all")
            for direction in charts.PROFILE_PANELS:
                charts.profile_chart(p.table, direction, synthetic=p.synthetic).to_dict()
            names = list(p.activations)[:3]
            charts.histogram_chart({n: p.activations[n] for n in names}).to_dict()
            times.append(time.perf_counter() - t)
        results[init] = times
        print(f"  init profile depth 30 {init:15s}: median {statistics.median(times):.2f} s "
              f"(runs: {', '.join(f'{x:.2f}' for x in times)}) -> {p.verdict}")
    print(f"  (warm-up profile, first in the process: {warm:.2f} s)")
    return results, warm


def bench_page(runs_dir):
    from streamlit.testing.v1 import AppTest

    os.environ["KERAS_VARINIT_RUNS_DIR"] = str(runs_dir)
    at = AppTest.from_file(str(REPO / "explorer" / "app.py"), default_timeout=300)
    at.query_params["data"] = os.environ.get("BENCH_DATA", "synthetic")
    at.query_params["depth"] = "30"
    t = time.perf_counter()
    at.run()
    cold = time.perf_counter() - t
    reruns = []
    for init in ("xavier_normal", "kaiming_uniform", "torch_default"):
        at.selectbox(key="init").set_value(init)
        t = time.perf_counter()
        at.run()
        reruns.append(time.perf_counter() - t)
        assert not at.exception, [e.value for e in at.exception]
    print(f"  page (AppTest) depth 30: first render {cold:.2f} s (script + Streamlit set-up; "
          f"TensorFlow already imported and warm from part 1); "
          f"rerun after changing the initializer: "
          f"{', '.join(f'{x:.2f}' for x in reruns)} s (median {statistics.median(reruns):.2f})")
    return cold, reruns


def images_per_second(store: RunStore, run_id: str, subset: int) -> float:
    metrics = store.metrics(run_id)
    later = metrics[metrics["epoch"] >= 2]
    return float(subset * len(later) / later["seconds"].sum())


def run_cli(settings, run_dir, device):
    argv = [sys.executable, "-m", "keras_varinit.cli",
            *presets.cli_args(settings, run_dir,
                              stats_every=presets.default_stats_every(settings))]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **device["env"])
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=env, cwd=str(REPO))


def run_explorer(settings, store, jobs):
    run_id = jobs.submit(settings)
    stop = threading.Event()

    def poll():  # what the page's fragment does every POLL_SECONDS
        while not stop.wait(1.5):
            store.list_runs()
            steps, metrics = store.steps(run_id), store.metrics(run_id)
            stats = store.layer_stats(run_id)
            charts.training_chart(steps, metrics, 10, "loss").to_dict()
            charts.training_chart(steps, metrics, 10, "accuracy").to_dict()
            charts.heatmap(stats, "activation_std").to_dict()
            charts.heatmap(stats, "activation_grad_std").to_dict()
            charts.fractions_chart(stats).to_dict()

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    state = jobs.wait(run_id, timeout=3600)
    stop.set()
    poller.join()
    if state != "finished":
        raise RuntimeError(f"explorer run ended {state}: {store.log_tail(run_id, 20)}")
    return run_id


def bench_training(settings, rounds, root, device):
    store = RunStore(root)
    jobs = JobManager(store, devices=[device])
    cli, exp = [], []
    try:
        for r in range(rounds):
            run_dir = store.new_run_dir(f"cli-{r}")
            run_cli(settings, run_dir, device)
            cli.append(images_per_second(store, run_dir.name, settings["subset"]))
            run_id = run_explorer(settings, store, jobs)
            exp.append(images_per_second(store, run_id, settings["subset"]))
            print(f"  round {r + 1}: CLI {cli[-1]:.0f} img/s, explorer {exp[-1]:.0f} img/s, "
                  f"ratio {exp[-1] / cli[-1]:.3f}")
    finally:
        jobs.shutdown()
    ratio = statistics.mean(exp) / statistics.mean(cli)
    per_round = [e / c for e, c in zip(exp, cli)]
    print(f"  training images/s: CLI mean {statistics.mean(cli):.0f}, explorer mean "
          f"{statistics.mean(exp):.0f} -> ratio of means {ratio:.3f}, median per-round ratio "
          f"{statistics.median(per_round):.3f} (goal >= 0.9)")
    return cli, exp, ratio


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller runs")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-page", action="store_true")
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--rounds", type=int, default=None,
                        help="CLI/explorer pairs for the throughput part (default 2, quick 1)")
    parser.add_argument("--subset", type=int, default=None,
                        help="training images per epoch (default 4096, quick 2048)")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto",
                        help="auto: the first GPU if there is one (as the explorer does), else CPU")
    args = parser.parse_args()
    device = detect_devices()[0] if args.device == "auto" else \
        {"id": "cpu", "name": "CPU", "env": {"CUDA_VISIBLE_DEVICES": ""}}
    import keras

    print(f"bench_explorer: Keras {keras.__version__} on {keras.backend.backend()}, "
          f"{os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if not args.skip_profile:
        print("1. init profile, depth-30 plain CNN (width 16), cache miss:")
        bench_profile(2 if args.quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_page:
            bench_page(pathlib.Path(tmp) / "page-runs")
        if not args.skip_training:
            settings = dict(presets.DEFAULTS, model="cnn", depth=10, width=16,
                            init="kaiming_normal", data="synthetic",
                            subset=args.subset or (2048 if args.quick else 4096),
                            batch_size=128,
                            epochs=3, lr=0.01)
            print(f"2. training throughput, {presets.describe(settings)}, "
                  f"{settings['subset']} synthetic images x {settings['epochs']} epochs, "
                  f"batch {settings['batch_size']}, {device['name']}:")
            rounds = args.rounds or (1 if args.quick else 2)
            bench_training(settings, rounds, pathlib.Path(tmp) / "runs", device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
