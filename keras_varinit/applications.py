"""`keras.applications` architectures a run can train instead of a built-in net, at CIFAR size.

Each is built with `weights=None` (random initialization: Keras's own initializers for that
architecture; nothing is downloaded), `input_shape=(32, 32, 3)`, `include_top=True`,
`classes=10` and `classifier_activation=None` (logits, as the trainer's loss expects). All of
`APPLICATIONS` build at 32 x 32, the smallest input these architectures accept (their pooling
stages leave a 1 x 1 map). MobileNetV3Small and EfficientNetB0 keep their own input
rescaling layers (made for 0-255 pixels; they see the trainer's standardized ones unless the
run's `input_normalization` is "none": for EfficientNetB0 the diagnosis's unnormalized-input
finding says so).

Importing this module does not import Keras (the names are part of the run schema).

>>> model = build_application("MobileNetV2")       # 2.3 M parameters, 156 layers
"""
from keras_varinit.checks import check_choice

#: Offered architectures, smallest first (parameters at 32 x 32 with 10 classes, measured:
#: 1.5 M, 2.3 M, 4.1 M, 7.0 M, 23.6 M).
APPLICATIONS = ("MobileNetV3Small", "MobileNetV2", "EfficientNetB0", "DenseNet121", "ResNet50")
INPUT_SHAPE = (32, 32, 3)
NUM_CLASSES = 10


def build_application(name, num_classes=NUM_CLASSES, input_shape=INPUT_SHAPE):
    """`keras.applications.<name>(weights=None, ...)` at CIFAR size (see the module doc)."""
    check_choice("application", name, APPLICATIONS)
    import keras

    constructor = getattr(keras.applications, name)
    return constructor(weights=None, input_shape=tuple(input_shape), include_top=True,
                       classes=num_classes, classifier_activation=None)
