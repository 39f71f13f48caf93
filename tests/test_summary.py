"""Tests for keras_lora.summary: parameter counts and the printed report."""

import keras
import pytest
from integration.models import MODEL_KINDS

import keras_lora

# Dense(64 -> 40) and Dense(40 -> 10): 64*40 + 40 + 40*10 + 10 = 3,010 base
# parameters. Rank 8 adds A (64, 8) + B (8, 40) = 832 and A (40, 8) + B (8, 10)
# = 400: 1,232 trainable of 4,242, 29.0429%.
BASE = 3_010
TRAINABLE = 832 + 400


def lora_model(**config_fields):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(40, activation="relu", name="dense"),
            keras.layers.Dense(10, name="head"),
        ]
    )
    return keras_lora.convert(model, **{"rank": 8, "alpha": 16, **config_fields})


def test_trainable_parameters_counts_the_adapters():
    expected = (TRAINABLE, BASE + TRAINABLE)
    assert keras_lora.trainable_parameters(lora_model()) == expected


def test_an_inactive_adapter_counts_in_all_parameters_only():
    model = lora_model()
    keras_lora.add_adapter(model, "b", keras_lora.LoraConfig(rank=2))
    # A (64, 2) + B (2, 40) and A (40, 2) + B (2, 10).
    added = 64 * 2 + 2 * 40 + 40 * 2 + 2 * 10
    total = BASE + TRAINABLE + added
    assert keras_lora.trainable_parameters(model) == (TRAINABLE, total)
    keras_lora.set_adapter(model, "b")
    assert keras_lora.trainable_parameters(model) == (added, total)


def test_train_and_bias_count_as_trainable():
    model = lora_model(targets=["dense"], train=["head"])
    assert keras_lora.trainable_parameters(model) == (832 + 410, BASE + 832)
    model = lora_model(bias="all")
    assert keras_lora.trainable_parameters(model) == (TRAINABLE + 50, BASE + TRAINABLE)


def test_a_plain_model_counts_its_own_weights():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert keras_lora.trainable_parameters(model) == (8, 8)


def test_a_shared_layer_counts_once():
    model, _ = MODEL_KINDS["shared_layer"]()
    lora = keras_lora.convert(model, rank=2)
    # shared: A (8, 2) + B (2, 8); each head: A (8, 2) + B (2, 2).
    assert keras_lora.trainable_parameters(lora)[0] == 32 + 2 * 20


def test_print_trainable_parameters_prints_peft_s_line(capsys):
    keras_lora.print_trainable_parameters(lora_model())
    assert capsys.readouterr().out == (
        "trainable params: 1,232 || all params: 4,242 || trainable%: 29.0429\n"
    )


def test_print_trainable_parameters_per_layer_lists_each_lora_layer(capsys):
    model = lora_model(rank_pattern={"head": 4})
    keras_lora.print_trainable_parameters(model, per_layer=True)
    lines = capsys.readouterr().out.splitlines()
    # head at rank 4: A (40, 4) + B (4, 10) = 200, scale 16 / 4 = 4.
    assert lines[0] == (
        "trainable params: 1,032 || all params: 4,042 || trainable%: 25.5319"
    )
    assert [line.split() for line in lines[1:]] == [
        ["path", "type", "adapters", "rank", "scale", "params"],
        ["dense", "LoraDense", "default", "8", "2", "832"],
        ["head", "LoraDense", "default", "4", "4", "200"],
    ]
    # Columns are aligned.
    assert len({line.index("LoraDense") for line in lines[2:]}) == 1


@pytest.mark.parametrize("per_layer", [False, True])
def test_print_trainable_parameters_of_a_model_without_weights(capsys, per_layer):
    model = keras.Sequential([keras.Input((3,)), keras.layers.ReLU()])
    keras_lora.print_trainable_parameters(model, per_layer=per_layer)
    out = capsys.readouterr().out
    assert out.startswith("trainable params: 0 || all params: 0 || trainable%: 0.0000")


@pytest.mark.parametrize(
    "config, extra",
    [
        # head trained in full: 40 * 10 + 10.
        ({"targets": ["dense"], "train": ["head"]}, [["head", "Dense", "410"]]),
        # bias="all": each wrapper's base bias, 40 and 10.
        ({"bias": "all"}, [["dense", "LoraDense", "40"], ["head", "LoraDense", "10"]]),
    ],
    ids=["train", "bias"],
)
def test_the_per_layer_rows_add_up_to_the_trainable_total(capsys, config, extra):
    model = lora_model(**config)
    keras_lora.print_trainable_parameters(model, per_layer=True)
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[2:]]
    trained = [[row[0], row[1], row[-1]] for row in rows if "(trained)" in row]
    assert trained == extra
    total = sum(int(row[-1].replace(",", "")) for row in rows)
    assert total == keras_lora.trainable_parameters(model)[0]
