"""The model zoo: tiny, built keras-hub backbones and keras.applications
models that every check in `test_zoo.py` runs over.

Each factory builds its model from a tiny random config (no preset, no
download; keras-hub is in the "dev" extra), deterministically, and returns
`(model, inputs, attention_targets)`:
`inputs` a NumPy batch (a dict for keras-hub backbones, keyed by the model's
input names), `attention_targets` the `targets` that select the attention
projections of every block (for a CNN, its convolutions).
"""

import keras
import keras_hub
import numpy as np

VOCABULARY = 50
SEQUENCE = 8
BATCH = 2
IMAGE = 32
HIDDEN = 16
HEADS = 2
INTERMEDIATE = 32


def model_inputs(model, seed=0) -> dict | np.ndarray:
    """A batch for `model`, from its symbolic inputs: token ids below
    `VOCABULARY`, padding masks of ones but for the last position of the
    second example, segment ids of zeros, images from a normal distribution."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for tensor in model.inputs:
        shape = [BATCH, *(SEQUENCE if d is None else d for d in tensor.shape[1:])]
        name = tensor.name
        if "padding_mask" in name:
            value = np.ones(shape, dtype="int32")
            value[1, -1] = 0
        elif "segment_ids" in name:
            value = np.zeros(shape, dtype="int32")
        elif "int" in str(tensor.dtype):
            value = rng.integers(1, VOCABULARY, size=shape).astype("int32")
        else:
            value = rng.normal(size=shape).astype("float32")
        arrays[name] = value
    if len(arrays) == 1 and not isinstance(model.input, dict):
        return next(iter(arrays.values()))
    return arrays


def _hub(cls_name, attention_targets, **config):
    def factory():
        keras.utils.set_random_seed(0)
        model = getattr(keras_hub.models, cls_name)(**config)
        return model, model_inputs(model), attention_targets

    return factory


def calibrate_batch_norm(model, inputs) -> None:
    """Sets the moving statistics of every BatchNormalization from `inputs`.

    With random weights, activations vanish through a deep CNN (MobileNetV2's
    logits are ~1e-11), which would make every tolerance check vacuous. One
    training-mode pass, with momentum 0 and dropout off, stores each layer's
    batch statistics as its moving ones. The variance is floored at 1: a
    channel almost constant over the batch would otherwise be amplified up to
    `1 / sqrt(epsilon)` times, and a random network of such layers is chaotic
    (merging an adapter, a change at float32 rounding, moves its logits 1e-4).
    """
    settings = {
        "momentum": keras.layers.BatchNormalization,
        "rate": keras.layers.Dropout,
    }
    saved = [
        (layer, attribute, getattr(layer, attribute))
        for layer in model.layers  # keras.applications models are flat
        for attribute, cls in settings.items()
        if isinstance(layer, cls)
    ]
    for layer, attribute, _ in saved:
        setattr(layer, attribute, 0.0)
    model(inputs, training=True)
    for layer, attribute, value in saved:
        setattr(layer, attribute, value)
        if attribute == "momentum":
            layer.moving_variance.assign(keras.ops.maximum(layer.moving_variance, 1.0))


def _application(cls_name, attention_targets, calibrate=False, **config):
    def factory():
        keras.utils.set_random_seed(0)
        model = getattr(keras.applications, cls_name)(
            weights=None,
            input_shape=(IMAGE, IMAGE, 3),
            classes=3,
            classifier_activation=None,
            **config,
        )
        inputs = model_inputs(model)
        if calibrate:
            calibrate_batch_norm(model, model_inputs(model, seed=1))
        return model, inputs, attention_targets

    factory.application = cls_name
    return factory


_TEXT = {"vocabulary_size": VOCABULARY, "num_layers": 1, "hidden_dim": HIDDEN}
_ATTENTION = ["query", "key", "value", "attention_output"]

ZOO = {
    "gpt2": _hub(
        "GPT2Backbone",
        _ATTENTION,
        **_TEXT,
        num_heads=HEADS,
        intermediate_dim=INTERMEDIATE,
        dropout=0.0,
        max_sequence_length=SEQUENCE,
    ),
    "llama": _hub(
        "LlamaBackbone",
        _ATTENTION,
        **_TEXT,
        num_query_heads=HEADS,
        num_key_value_heads=1,
        intermediate_dim=INTERMEDIATE,
    ),
    "gemma": _hub(
        "GemmaBackbone",
        _ATTENTION,
        **_TEXT,
        num_query_heads=HEADS,
        num_key_value_heads=1,
        intermediate_dim=INTERMEDIATE,
        head_dim=8,
    ),
    "gemma3": _hub(
        "Gemma3Backbone",
        _ATTENTION,
        **_TEXT,
        image_size=16,
        num_query_heads=HEADS,
        num_key_value_heads=1,
        intermediate_dim=INTERMEDIATE,
        head_dim=8,
    ),
    "mistral": _hub(
        "MistralBackbone",
        _ATTENTION,
        **_TEXT,
        num_query_heads=HEADS,
        num_key_value_heads=1,
        intermediate_dim=INTERMEDIATE,
        sliding_window=SEQUENCE,
    ),
    "qwen": _hub(
        "QwenBackbone",
        _ATTENTION,
        **_TEXT,
        num_query_heads=HEADS,
        num_key_value_heads=1,
        intermediate_dim=INTERMEDIATE,
    ),
    "phi3": _hub(
        "Phi3Backbone",
        _ATTENTION,
        **_TEXT,
        num_query_heads=HEADS,
        num_key_value_heads=1,
        intermediate_dim=INTERMEDIATE,
        max_sequence_length=SEQUENCE,
        pretraining_sequence_length=SEQUENCE,
    ),
    "opt": _hub(
        "OPTBackbone",
        _ATTENTION,
        **_TEXT,
        num_heads=HEADS,
        intermediate_dim=INTERMEDIATE,
        dropout=0.0,
        max_sequence_length=SEQUENCE,
    ),
    "falcon": _hub(
        "FalconBackbone",
        [f"attention/{name}_dense" for name in ("query", "key", "value", "output")],
        **_TEXT,
        num_attention_heads=HEADS,
        intermediate_dim=INTERMEDIATE,
    ),
    "bert": _hub(
        "BertBackbone",
        _ATTENTION,
        **_TEXT,
        num_heads=HEADS,
        intermediate_dim=INTERMEDIATE,
        dropout=0.0,
        max_sequence_length=SEQUENCE,
    ),
    "roberta": _hub(
        "RobertaBackbone",
        _ATTENTION,
        **_TEXT,
        num_heads=HEADS,
        intermediate_dim=INTERMEDIATE,
        dropout=0.0,
        max_sequence_length=SEQUENCE,
    ),
    "distil_bert": _hub(
        "DistilBertBackbone",
        _ATTENTION,
        **_TEXT,
        num_heads=HEADS,
        intermediate_dim=INTERMEDIATE,
        dropout=0.0,
        max_sequence_length=SEQUENCE,
    ),
    "albert": _hub(
        "AlbertBackbone",
        _ATTENTION,
        **_TEXT,
        num_heads=HEADS,
        embedding_dim=8,
        intermediate_dim=INTERMEDIATE,
        max_sequence_length=SEQUENCE,
    ),
    "deberta_v3": _hub(
        "DebertaV3Backbone",
        _ATTENTION,
        **_TEXT,
        num_heads=HEADS,
        intermediate_dim=INTERMEDIATE,
        dropout=0.0,
        max_sequence_length=SEQUENCE,
        bucket_size=4,
    ),
    "electra": _hub(
        "ElectraBackbone",
        _ATTENTION,
        vocab_size=VOCABULARY,
        num_layers=1,
        hidden_dim=HIDDEN,
        num_heads=HEADS,
        embedding_dim=8,
        intermediate_dim=INTERMEDIATE,
        dropout=0.0,
        max_sequence_length=SEQUENCE,
    ),
    "bart": _hub(
        "BartBackbone",
        _ATTENTION,
        **_TEXT,
        num_heads=HEADS,
        intermediate_dim=INTERMEDIATE,
        dropout=0.0,
        max_sequence_length=SEQUENCE,
    ),
    "vit": _hub(
        "ViTBackbone",
        _ATTENTION,
        image_shape=(16, 16, 3),
        patch_size=8,
        num_layers=1,
        num_heads=HEADS,
        hidden_dim=HIDDEN,
        mlp_dim=INTERMEDIATE,
    ),
    "resnet": _hub(
        "ResNetBackbone",
        ["*_conv"],
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64],
        stackwise_num_blocks=[1],
        stackwise_num_strides=[1],
        block_type="basic_block",
        image_shape=(16, 16, 3),
    ),
    "resnet50": _application("ResNet50", ["*_conv"]),
    # Depthwise convolutions are left out: they have no wrapper.
    "mobilenet_v2": _application(
        "MobileNetV2",
        ["Conv1", "*_expand", "*_project", "Conv_1"],
        calibrate=True,
        alpha=0.35,
    ),
    "efficientnet_b0": _application(
        "EfficientNetB0", ["*_conv", "*_se_reduce", "*_se_expand"], calibrate=True
    ),
    # The stem and downsampling convolutions; the depthwise ones are grouped
    # convolutions (groups = channels), which a rank-4 adapter cannot take.
    "convnext_tiny": _application(
        "ConvNeXtTiny", ["*_stem_conv", "*_downsampling_conv_*"]
    ),
}
"""Model name -> factory returning `(model, inputs, attention_targets)`."""

EXPECTED_ADAPTED = {
    **{name: 4 for name in ZOO},
    "bart": 12,
    "resnet": 3,
    "resnet50": 53,
    "mobilenet_v2": 35,
    "efficientnet_b0": 65,
    "convnext_tiny": 4,
}
"""How many layers each model's `attention_targets` adapt: q, k, v and output
projections of every attention layer (BART: encoder self-, decoder self- and
cross-attention), or every ungrouped convolution of a CNN."""
