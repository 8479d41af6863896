"""Fixtures of the training tests: the toy model of `train_toy.py`."""

import pytest
from train_toy import Toy, make_toy


@pytest.fixture
def toy() -> Toy:
    return make_toy()


@pytest.fixture
def toy_no_dropout() -> Toy:
    return make_toy(dropout=0.0)
