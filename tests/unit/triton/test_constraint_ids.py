"""The `constraint_ids` input: to Request.constraints, errors under the input's name, in the model config."""

import re

import numpy as np
import pytest

from service.cli import DEFAULT_CHECKPOINT
from service.errors import InvalidArgument
from service.model.config import read_config
from service.text.tokenizer import load_tokenizer
from service.sampler.constraints import JSON_STRING, NUM_CLASSES, NUMBER_FIRST, NUMBER_REST
from service.triton.adapter import INPUT_NAMES, request_from_inputs
from service.triton.repository import RepositorySettings, render_config


@pytest.fixture(scope="module")
def tiny():
    return read_config(DEFAULT_CHECKPOINT), load_tokenizer(DEFAULT_CHECKPOINT)


def ids(*v):
    return np.array(v, dtype=np.int32)


def test_constraint_ids_become_request_constraints(tiny):
    cfg, tok = tiny
    req = request_from_inputs({"input_ids": ids(2, 3), "constraint_ids": ids(NUMBER_FIRST, NUMBER_REST)}, cfg, tok)
    assert req.constraints == [NUMBER_FIRST, NUMBER_REST] and all(type(c) is int for c in req.constraints)
    assert request_from_inputs({"input_ids": ids(2, 3)}, cfg, tok).constraints is None


@pytest.mark.parametrize("values", [(NUM_CLASSES,), (-1,), (JSON_STRING,) * 65])
def test_bad_constraint_ids_name_the_input(tiny, values):
    cfg, tok = tiny
    with pytest.raises(InvalidArgument) as e:
        request_from_inputs({"input_ids": ids(2), "constraint_ids": ids(*values)}, cfg, tok)
    assert e.value.field == "constraint_ids"


def test_constraint_ids_need_a_tokenizer(small_ckpt):
    cfg = read_config(small_ckpt)
    with pytest.raises(InvalidArgument) as e:
        request_from_inputs({"input_ids": ids(2), "constraint_ids": ids(0, NUMBER_REST)}, cfg, None)
    assert e.value.field == "constraint_ids"
    assert request_from_inputs({"input_ids": ids(2), "constraint_ids": ids(0, 0)}, cfg, None).constraints == [0, 0]


def test_model_config_declares_every_input(small_ckpt):
    text = render_config(RepositorySettings(checkpoint_dir=str(small_ckpt)))
    declared = set(re.findall(r'\{ name: "(\w+)" data_type: \w+ dims: \[ [-0-9]+ \] optional: true', text))
    assert "constraint_ids" in INPUT_NAMES and set(INPUT_NAMES) <= declared
    assert '{ name: "constraint_ids" data_type: TYPE_INT32 dims: [ -1 ] optional: true }' in text


def test_choice_ids_become_request_choices(tiny):
    cfg, tok = tiny
    req = request_from_inputs({"input_ids": ids(2), "constraint_ids": ids(NUM_CLASSES + 1, NUM_CLASSES),
                               "choice_ids": ids(5, 9, -1, 7, -1)}, cfg, tok)
    assert req.choices == [[5, 9], [7]] and req.constraints == [NUM_CLASSES + 1, NUM_CLASSES]


@pytest.mark.parametrize("values", [(5, 9), (5, -1, -1), (99999, -1)])
def test_bad_choice_ids_name_the_input(tiny, values):
    cfg, tok = tiny
    with pytest.raises(InvalidArgument) as e:
        request_from_inputs({"input_ids": ids(2), "constraint_ids": ids(NUM_CLASSES), "choice_ids": ids(*values)},
                            cfg, tok)
    assert e.value.field == "choice_ids"
