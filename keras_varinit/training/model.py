"""The network and optimizer of a run: ``models.build_model`` for a ``TrainConfig``, LSUV when
asked, and the compiled model that ``run_training`` fits."""
import keras

from keras_varinit import initializers, models

NUM_CLASSES = 10
LSUV_BATCH = 256   # images LSUV calibrates on (at least one training batch)


def build_model(config, input_shape):
    """The model (uncompiled) of ``config`` for inputs of ``input_shape`` (an MLP flattens
    images itself); "lsuv" starts orthogonal, LSUV runs in ``compile_model``."""
    init = "orthogonal" if config.init == "lsuv" else config.init
    return models.build_model(
        kind=config.model, depth=config.depth, width=config.width, kernel_initializer=init,
        activation=config.activation, normalization=config.normalization,
        groups=config.groups, num_classes=NUM_CLASSES, seed=config.seed,
        input_shape=input_shape)


def make_optimizer(config):
    """SGD or RMSprop with ``config.momentum``, or Adam, at ``config.lr``."""
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=config.lr, momentum=config.momentum)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=config.lr)
    return keras.optimizers.RMSprop(learning_rate=config.lr, momentum=config.momentum)


def compile_model(config, x_train, synchronized=False):
    """Build ``config``'s model for ``x_train``, run LSUV on its first images if asked, and
    compile it (cross-entropy on the logits, accuracy). ``synchronized``: under a
    ``tf.distribute`` strategy, batch normalization takes its statistics over the global batch
    (``synchronized=True``), so that several replicas train as one device would; under JAX's
    data parallelism they are global already (each op sees the whole sharded batch)."""
    model = build_model(config, x_train.shape[1:])
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = synchronized  # read when the layer is first called
    if config.init == "lsuv":
        initializers.lsuv(model, x_train[: max(config.batch_size, LSUV_BATCH)])
    model.compile(optimizer=make_optimizer(config),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model
