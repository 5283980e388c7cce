"""`import keras_varinit` (and the run schema) without Keras; the package's names on first use;
registration with Keras as soon as Keras is imported."""
import os
import pathlib
import subprocess
import sys
import textwrap


from keras_varinit import initializers, net_options

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(script):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_package_and_schema_import_no_keras_and_register_once_keras_is_loaded():
    _run("""
        import sys, types
        import keras_varinit as kv
        from keras_varinit.training import TrainConfig
        from keras_varinit.cli import train
        import explorer.presets, explorer.worker, explorer.your_model
        TrainConfig(init="normal:0.01").validate()
        assert not {"keras", "tensorflow", "jax"} & set(sys.modules), "Keras was imported"
        import keras                       # registered right after Keras is imported
        assert keras.saving.get_registered_object("keras_varinit>KaimingNormal") is not None
        for name in [n for n in sys.modules if n.split(".")[0] == "keras_varinit"]:
            del sys.modules[name]
        import keras_varinit as kv         # Keras is loaded now: registered at import
        assert keras.saving.get_registered_object("keras_varinit>KaimingNormal") is not None
        assert keras.saving.get_registered_object("keras_varinit>BatchNormalization")
        import keras_varinit.channel_stats            # the module shares the function's name
        assert callable(kv.channel_stats) and not isinstance(kv.channel_stats, types.ModuleType)
        assert kv.variance_profile.__module__ == "keras_varinit.diagnostics"
        from keras_varinit.training import run_training
        """)


def test_the_schemas_initializer_names_are_the_factories():
    assert tuple(initializers._FACTORIES) == net_options.INITIALIZER_NAMES == initializers.NAMES
    assert net_options.is_own_initializer("Kaiming_Normal")
    assert net_options.is_own_initializer("normal:0.5")
    assert not net_options.is_own_initializer("normal:-1")
    assert not net_options.is_own_initializer("he_normal")    # Keras's: asked to Keras



# The modules a user imports on their own (they failed as a circular import before the hook
# waited for them), plus the core every diagnostic goes through.
FIRST_IMPORTS = ("layers", "lsuv", "probe", "layer_stats_logger", "diagnosis_logger",
                 "instrument", "diagnostics", "initializers")


def test_each_module_imports_first_in_a_fresh_process():
    """`import keras_varinit.layers` (or another module) first: its own `import keras` fires
    the registration hook, which must wait until that module is built. One process each, run
    side by side."""
    check = textwrap.dedent("""
        import keras_varinit.{module}
        import keras, sys
        assert keras.saving.get_registered_object("keras_varinit>KaimingNormal")
        assert keras.saving.get_registered_object("keras_varinit>BatchNormalization")
        assert not [f for f in sys.meta_path if type(f).__name__ == "_RegisterAfterKeras"]
        """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    runs = {m: subprocess.Popen([sys.executable, "-c", check.format(module=m)], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
            for m in FIRST_IMPORTS}
    failed = {}
    for module, run in runs.items():
        _, err = run.communicate(timeout=300)
        if run.returncode:
            failed[module] = err[-1500:]
    assert not failed, failed
