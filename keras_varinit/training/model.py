"""The network and optimizer of a run: ``models.build_model`` for a ``TrainConfig`` (or the
user's model: a ``.keras`` file, a ``keras.applications`` architecture), LSUV when asked, and
the compiled model that ``run_training`` fits."""
import keras

from keras_varinit import initializers, models, user_models
from keras_varinit.applications import build_application

NUM_CLASSES = 10
LSUV_BATCH = 256   # images LSUV calibrates on (at least one training batch)


def build_model(config, input_shape):
    """The model (uncompiled) of ``config`` for inputs of ``input_shape`` (an MLP flattens
    images itself); "lsuv" starts orthogonal, LSUV runs in ``compile_model``. A user's model
    (``user_model``) must take CIFAR-10 images and give 10 outputs."""
    if config.model == "file" or config.model == "application":
        return user_model(config, input_shape)
    init = "orthogonal" if config.init == "lsuv" else config.init
    return models.build_model(
        kind=config.model, depth=config.depth, width=config.width, kernel_initializer=init,
        activation=config.activation, normalization=config.normalization,
        groups=config.groups, num_classes=NUM_CLASSES, seed=config.seed,
        input_shape=input_shape)


def user_model(config, input_shape):
    """The ``.keras`` file ``config.model_file`` loaded as saved (safe mode, no compile state:
    ``user_models.load_model_file``) or ``config.application`` built with ``weights=None``;
    ValueError if it does not take ``input_shape`` images, does not give ``NUM_CLASSES``
    outputs or has nothing to train."""
    if config.model == "application":
        return build_application(config.application, NUM_CLASSES, input_shape)
    model = user_models.load_model_file(config.model_file)
    user_models.check_cifar10_input(model)
    outputs = model.outputs or []
    shape = tuple(outputs[0].shape) if len(outputs) == 1 else None
    if shape is None or len(shape) != 2 or shape[-1] != NUM_CLASSES:
        raise ValueError(
            f"{config.model_file} does not end in one output of {NUM_CLASSES} classes. "
            f"Received: outputs of shape {[tuple(o.shape) for o in outputs] or 'unknown'}. "
            f"Allowed: a single (batch, {NUM_CLASSES}) output (logits or softmax) for CIFAR-10.")
    if not model.trainable_weights:
        raise ValueError(
            f"{config.model_file} has no trainable weights (every layer was saved with "
            "trainable=False): training would change nothing. Allowed: a model with trainable "
            "layers (set layer.trainable = True before model.save).")
    return model


def gives_probabilities(model):
    """Whether ``model``'s last layer is a softmax (then the loss takes probabilities, not
    logits): a ``Softmax`` layer or a layer with ``activation="softmax"``."""
    last = model.layers[-1]
    return isinstance(last, keras.layers.Softmax) or \
        last.get_config().get("activation") == "softmax"


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
    logits = not gives_probabilities(model)
    model.compile(optimizer=make_optimizer(config),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=logits),
                  metrics=["accuracy"])
    return model
