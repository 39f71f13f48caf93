"""AdapterSettings: one adapter's settings, checked once, with its scale and
its saved form."""

import math

import numpy as np
import pytest

from keras_lora.layers import AdapterSettings


@pytest.mark.parametrize(
    "settings, scale",
    [
        (AdapterSettings(rank=4), 1.0),
        (AdapterSettings(rank=4, alpha=8), 2.0),
        (AdapterSettings(rank=16, alpha=8), 0.5),
        (AdapterSettings(rank=16, alpha=8, use_rslora=True), 2.0),
        (AdapterSettings(rank=3, alpha=1.5, use_rslora=True), 1.5 / math.sqrt(3)),
    ],
)
def test_scale_is_alpha_over_rank_or_its_square_root(settings, scale):
    assert settings.scale == pytest.approx(scale, rel=1e-12)


def test_values_are_normalised_as_an_adapter_stores_them():
    settings = AdapterSettings(rank=np.int64(6), dropout=0)
    assert type(settings.rank) is int and settings.rank == 6
    assert settings.alpha == 6.0 and type(settings.alpha) is float
    assert type(settings.dropout) is float and settings.dropout == 0.0


def test_dict_round_trip_keeps_every_field():
    settings = AdapterSettings(
        rank=8, alpha=32, dropout=0.1, use_rslora=True, init="gaussian"
    )
    saved = settings.to_dict()
    assert saved == {
        "rank": 8,
        "alpha": 32.0,
        "dropout": 0.1,
        "use_rslora": True,
        "init": "gaussian",
        "use_dora": False,
    }
    assert AdapterSettings.from_dict(saved) == settings


def test_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match="rnak"):
        AdapterSettings.from_dict({"rnak": 4})


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        ({"rank": 0}, ValueError, "rank=0"),
        ({"rank": True}, ValueError, "rank=True"),
        ({"rank": 4, "alpha": -1.0}, ValueError, "alpha=-1.0"),
        ({"rank": 4, "dropout": 1.0}, ValueError, "dropout=1.0"),
        ({"rank": 4, "use_rslora": 1}, TypeError, "use_rslora=1"),
        ({"rank": 4, "init": "kaiming"}, ValueError, "init='kaiming'"),
        ({"rank": 3, "init": "orthogonal"}, ValueError, "rank=3"),
        ({"rank": 4, "use_dora": "yes"}, TypeError, "use_dora='yes'"),
    ],
)
def test_bad_settings_are_refused_naming_the_value(arguments, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(")):
        AdapterSettings(**arguments)
