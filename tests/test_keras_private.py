"""keras_lora.tree.keras_private leans on Keras' private state tracking
(`Layer._tracker`) and `Functional`. These tests fail loudly if a Keras release
changes them."""

import keras
import numpy as np
import pytest

from keras_lora import LoraDense
from keras_lora.tree.keras_private import (
    attributes,
    is_graph_model,
    producer,
    rewire,
    substituted_variable,
    unlocked_state,
)
from keras_lora.tree.walk import Reference

layers = keras.layers


def listed_once(variables):
    ids = [id(variable) for variable in variables]
    return len(ids) == len(set(ids))


def count(variable, variables):
    return sum(other is variable for other in variables)


def test_keras_tracker_api_is_what_tracking_relies_on():
    layer = layers.Dense(2)
    layer.build((None, 3))
    tracker = layer._tracker
    for method in ("lock", "unlock", "untrack", "is_in_store", "replace_tracked_value"):
        assert callable(getattr(tracker, method)), method
    assert tracker.locked is True
    with pytest.raises(ValueError, match="already built"):
        layer.add_weight(shape=(1,), name="refused")

    tracker.unlock()
    assert tracker.locked is False
    extra = layer.add_weight(shape=(1,), name="extra")
    assert tracker.is_in_store("trainable_variables", extra)
    assert count(extra, layer.weights) == 1
    tracker.untrack(extra)
    assert count(extra, layer.weights) == 0
    tracker.lock()
    assert tracker.locked is True


def test_unlocked_state_unlocks_then_restores_the_lock():
    built = layers.Dense(2)
    built.build((None, 3))
    with unlocked_state(built):
        assert not built._tracker.locked
        extra = built.add_weight(shape=(1,), name="extra")
    assert built._tracker.locked
    assert count(extra, built.weights) == 1

    unbuilt = layers.Dense(2)
    with unlocked_state(unbuilt):
        pass
    assert not unbuilt._tracker.locked


def test_unlocked_state_relocks_after_an_error():
    layer = layers.Dense(2)
    layer.build((None, 3))
    with pytest.raises(RuntimeError), unlocked_state(layer):
        raise RuntimeError
    assert layer._tracker.locked


def test_adapter_added_to_a_built_wrapper_is_listed_exactly_once():
    wrapper = LoraDense(layers.Dense(4), rank=2)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, wrapper(inputs))
    before = list(model.weights)

    wrapper.add_adapter("second", rank=2)
    added = [wrapper.adapters["second"].lora_a, wrapper.adapters["second"].lora_b]
    for variable in added:
        assert count(variable, wrapper.weights) == 1
        assert count(variable, model.weights) == 1
    assert listed_once(model.weights)
    assert all(count(variable, model.weights) == 1 for variable in before)
    # Every adapter's variables sit next to the base kernel.
    assert [v.path for v in added] == [
        f"{wrapper.layer.path}/second/lora_a",
        f"{wrapper.layer.path}/second/lora_b",
    ]
    assert wrapper.lora_a.path == f"{wrapper.layer.path}/default/lora_a"
    assert wrapper.layer.kernel.path == f"{wrapper.layer.path}/kernel"

    wrapper.set_adapter("second")
    assert [id(v) for v in model.trainable_weights] == [id(v) for v in added]
    wrapper.delete_adapter("second")
    assert all(count(variable, model.weights) == 0 for variable in added)
    assert [id(v) for v in model.weights] == [id(v) for v in before]


@keras.saving.register_keras_serializable(package="keras_lora_tests")
class Block(layers.Layer):
    """A subclassed layer holding sub-layers in an attribute, a list, a tuple
    and a dict, as transformer blocks do."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.proj = layers.Dense(4, name="proj")
        self.stack = [layers.Dense(4, name="stack_0"), layers.Dense(4, name="stack_1")]
        self.pair = (layers.Dense(4, name="pair_0"), layers.Dense(4, name="pair_1"))
        self.heads = {"head": layers.Dense(4, name="head")}

    def call(self, x):
        x = self.proj(x)
        for layer in [*self.stack, *self.pair]:
            x = layer(x)
        return self.heads["head"](x)


REFERENCES = {
    "attribute": ("proj", None),
    "list_item": ("stack", 1),
    "tuple_item": ("pair", 0),
    "dict_item": ("heads", "head"),
}


@pytest.mark.parametrize("where", list(REFERENCES))
def test_rewire_swaps_a_sub_layer_of_a_built_layer_without_losing_variables(where):
    keras.utils.set_random_seed(0)
    block = Block()
    model = keras.Sequential([keras.Input((3,)), block])
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x))
    block_before, model_before = list(block.weights), list(model.weights)

    reference = Reference(block, *REFERENCES[where])
    old = reference.get()
    wrapper = LoraDense(old, rank=2)
    rewire(reference, wrapper)

    assert reference.get() is wrapper
    assert block._tracker.locked
    adapters = [wrapper.lora_a, wrapper.lora_b]
    for weights, before in (
        (block.weights, block_before),
        (model.weights, model_before),
    ):
        assert listed_once(weights)
        assert all(count(variable, weights) == 1 for variable in [*before, *adapters])
        assert len(weights) == len(before) + 2
        # The old variables keep their order.
        kept = [v for v in weights if any(v is b for b in before)]
        assert [id(v) for v in kept] == [id(v) for v in before]
    assert all(count(v, block.trainable_weights) == 0 for v in old.weights)
    assert all(count(v, block.trainable_weights) == 1 for v in adapters)
    assert wrapper in block._layers and old not in block._layers
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(x)), expected, rtol=0, atol=1e-6
    )


def test_attributes_list_sub_layers_wherever_the_backend_keeps_them():
    block = Block()
    block.alias = block.proj  # one layer held by two attributes
    found = attributes(block)
    layer_attributes = [
        (name, value) for name, value in found if isinstance(value, layers.Layer)
    ]
    assert [name for name, _ in layer_attributes] == ["proj", "alias"]
    assert all(value is block.proj for _, value in layer_attributes)
    assert [name for name, value in found if value is block.stack] == ["stack"]
    if keras.backend.backend() == "torch":
        # What `attributes` relies on: torch.nn.Module keeps module-valued
        # attributes in `_modules`, not in the instance dict.
        assert "proj" not in vars(block)
        assert block._modules["proj"] is block._modules["alias"] is block.proj
    else:
        assert found == list(vars(block).items())


def test_is_graph_model_tells_layer_graphs_from_subclassed_models():
    inputs = keras.Input((3,))
    functional = keras.Model(inputs, layers.Dense(2)(inputs))

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    assert is_graph_model(functional)
    assert is_graph_model(keras.Sequential([keras.Input((3,)), layers.Dense(2)]))
    assert not is_graph_model(Subclassed())
    assert not is_graph_model(layers.Dense(2))


@pytest.mark.parametrize(
    ("layer", "input_shape", "attribute"),
    [
        (layers.Dense(3), (2, 4), "kernel"),
        (layers.EinsumDense("ab,bc->ac", output_shape=3), (2, 4), "kernel"),
        (layers.Conv2D(3, 2), (1, 3, 3, 2), "kernel"),
        (layers.Embedding(5, 3), (2, 4), "embeddings"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, layers.Layer) else "",
)
def test_substituted_variable_makes_the_layer_call_read_the_value(
    layer, input_shape, attribute
):
    layer.build(input_shape)
    variable = getattr(layer, attribute)
    inputs = (
        np.arange(8).reshape(input_shape) % 5
        if isinstance(layer, layers.Embedding)
        else np.ones(input_shape, "float32")
    )
    value = keras.ops.ones(variable.shape)
    with substituted_variable(layer, variable, value):
        assert getattr(layer, attribute) is value
        substituted = keras.ops.convert_to_numpy(layer(inputs))
    assert getattr(layer, attribute) is variable
    variable.assign(keras.ops.ones(variable.shape))
    np.testing.assert_array_equal(
        substituted, keras.ops.convert_to_numpy(layer(inputs))
    )


def test_substituted_variable_refuses_a_variable_the_layer_does_not_hold():
    layer = layers.Dense(2)
    layer.build((None, 3))
    other = keras.Variable(np.zeros((3, 2)), name="other")
    with pytest.raises(ValueError, match="holds variable"):
        with substituted_variable(layer, other, keras.ops.ones((3, 2))):
            pass


def test_producer_finds_the_layer_call_behind_a_symbolic_tensor():
    """`producer` reads `KerasTensor._keras_history` and the layer's
    `_inbound_nodes`; this fails loudly if Keras changes either."""
    inputs = layers.Input((4,))
    shared = layers.Dense(4, name="shared")
    first = shared(inputs)
    second = shared(first)
    split = layers.Lambda(lambda x: (x, -x), name="split")(second)
    model = keras.Model(inputs, [split[1], second])
    layer, call_inputs, index = producer(model.outputs[0])
    assert layer.name == "split" and index == 1
    assert call_inputs == [second]
    layer, call_inputs, index = producer(second)
    assert layer is shared and call_inputs == [first] and index == 0
    layer, call_inputs, _ = producer(first)
    assert layer is shared and call_inputs == [inputs]
