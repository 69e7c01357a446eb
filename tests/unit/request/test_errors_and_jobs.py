"""The error table, Triton's streamed errors read back, and public requests reduced to jobs."""

import grpc
import pytest

from service import DEFAULT_CHECKPOINT
from service.errors import (
    Cancelled,
    CheckpointError,
    DeadlineExceeded,
    DGemmaError,
    InvalidArgument,
    Overloaded,
    Unauthenticated,
    Unavailable,
)
from service.request import jobs
from service.request.catalog import ServedModel
from service.request.errors import GRPC_STATUS, error_from_triton, public_message, status_for


def test_every_domain_error_has_a_status_and_internal_is_generic():
    for cls in (InvalidArgument, Overloaded, DeadlineExceeded, Cancelled, Unauthenticated, Unavailable,
                CheckpointError):
        assert cls in GRPC_STATUS
    assert status_for(Overloaded("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_for(KeyError("x")) == grpc.StatusCode.INTERNAL
    assert public_message(CheckpointError("/secret/path broken"), "r1") == "internal error (request_id=r1)"
    assert public_message(InvalidArgument("a", "b"), "r1") == "a: b"


@pytest.mark.parametrize("text, cls, field", [
    ("INVALID_ARG: max_denoising_steps: must be in [1, 1024], got 0", InvalidArgument,
     "options.parameters.max_denoising_steps"),
    ("INVALID_ARG: input_ids: id 9 is outside", InvalidArgument, "text"),
    ("OVERLOADED: engine overloaded: 64 requests already waiting", Overloaded, None),
    # the code alone decides (issue 17, finding 9): words in the message never do
    ("UNAVAILABLE: engine overloaded: 64 requests already waiting", Unavailable, None),
    ("DEADLINE_EXCEEDED: deadline exceeded", DeadlineExceeded, None),
    ("UNAVAILABLE: deadline exceeded", Unavailable, None),
    ("UNAVAILABLE: the engine is shutting down", Unavailable, None),
    # Triton's own errors carry no code: the model cannot serve now (a dead backend stub: never INTERNAL)
    ("Failed to process the request(s) for model instance 'diffusiongemma_0_0', message: Stub process "
     "'diffusiongemma_0_0' is not healthy.", Unavailable, None),
    # ...except Triton's own full-queue refusal, matched as its whole text: overload, clients back off
    ("Exceeds maximum queue size", Overloaded, None),
    ("Failed to process: Exceeds maximum queue size", Unavailable, None),
    ("CANCELLED: request cancelled", Cancelled, None),
    ("INTERNAL: internal error", DGemmaError, None),
])
def test_triton_errors_read_back_as_domain_errors(text, cls, field):
    err = error_from_triton(text, jobs.field_names("text"))
    assert type(err) is cls
    assert "Stub process" not in public_message(err, "r")
    if field:
        assert err.field == field


@pytest.fixture(scope="module")
def model():
    return ServedModel.load(DEFAULT_CHECKPOINT, "diffusiongemma", "torch-fp32-cpu")


def test_job_inputs_carry_only_what_was_set(model):
    opts = jobs.options_of({"t_min": 0.3, "entropy_bound": None}, 2, 7, 3)
    ids, field = jobs.prompt_ids(model, "def ", None, None)
    job = jobs.Job("rid", ids, opts, max_new_tokens=64, pin_ids=[5, 6], constraint_ids=[0, 3])
    t = job.inputs(2)
    assert t["seed"].values == [9] and t["request_id"].values == ["rid/2"] and t["input_ids"].values == ids
    assert t["t_min"].datatype == "FP32" and t["sampler"].values == ["fast"] and "entropy_bound" not in t
    assert t["pin_mask"].values == [True, True] and t["constraint_ids"].datatype == "INT32"
    assert "return_drafts" not in t and field == "text"


def test_temperature_and_top_k_are_typed_inputs_checked_before_admission(model):
    from service.request.dispatch import Dispatcher

    job = jobs.Job("rid", [2, 3], jobs.options_of({"temperature": 0.0, "top_k": 5}, 0, 1, 1),
                   field_names=jobs.field_names("text"))
    t = job.inputs(0)
    assert (t["temperature"].datatype, t["temperature"].values) == ("FP32", [0.0])
    assert (t["top_k"].datatype, t["top_k"].values) == ("INT32", [5])
    dispatcher = Dispatcher(model, triton=None)
    try:
        dispatcher.check_params(job)
        for params, field in (({"temperature": 2.5}, "options.parameters.temperature"),
                              ({"top_k": -2}, "options.parameters.top_k"),
                              ({"temperature": 4.0, "t_min": 0.1}, "options.parameters.temperature")):
            bad = jobs.Job("rid", [2, 3], jobs.options_of(params, 0, 1, 1), field_names=jobs.field_names("text"))
            with pytest.raises(InvalidArgument) as e:
                dispatcher.check_params(bad)
            assert e.value.field == field
    finally:
        dispatcher.close()


@pytest.mark.parametrize("call, field", [
    (lambda m: jobs.options_of({}, 0, 0, 17), "options.num_variations"),
    (lambda m: jobs.options_of({}, 9, 0, 1), "options.parameters.sampler"),
    (lambda m: jobs.options_of({}, 0, 2**63 - 1, 2), "options.seed"),
    (lambda m: jobs.request_id_of("x" * 129), "request_id"),
    (lambda m: jobs.prompt_ids(m, "", None, None), "text"),
    (lambda m: jobs.prompt_ids(m, None, [], None), "chat.messages"),
    (lambda m: jobs.prompt_ids(m, None, [("user", "a"), ("bot", "b")], None), "chat.messages[1].role"),
    (lambda m: jobs.prompt_ids(m, None, None, [1, -1]), "token_ids.ids[1]"),
    (lambda m: jobs.prompt_ids(m, None, None, None), "prompt"),
])
def test_validation_names_the_field(model, call, field):
    with pytest.raises(InvalidArgument) as e:
        call(model)
    assert e.value.field == field


def test_chat_roles_and_defaults(model):
    ids, field = jobs.prompt_ids(model, None, [("system", "s"), ("assistant", "a"), ("user", "u")], None)
    assert field == "chat" and ids == model.tokenizer.chat_prompt([("system", "s"), ("model", "a"), ("user", "u")])
    assert jobs.options_of({}, 0, None, 0) == jobs.Options({}, 0, 1)


def test_the_table_gives_http_statuses_and_openai_types():
    from service.errors import DeadlineExceeded, PayloadTooLarge, Unauthenticated, Unavailable, UnknownModel
    from service.request.errors import public_status

    cases = {InvalidArgument("a", "b"): (400, "invalid_request_error"), UnknownModel("model", "x"): (404, None),
             PayloadTooLarge("body", "x"): (413, None), Overloaded("x"): (429, "rate_limit_error"),
             DeadlineExceeded("x"): (504, None), Unauthenticated("x"): (401, "authentication_error"),
             Unavailable("x"): (503, None), CheckpointError("x"): (500, None), KeyError("x"): (500, None)}
    for err, (http, type_) in cases.items():
        s = public_status(err)
        assert s.http == http and (type_ is None or s.type == type_), err
    assert status_for(UnknownModel("model", "x")) == grpc.StatusCode.INVALID_ARGUMENT  # gRPC keeps its code


def test_openai_paths_name_the_http_fields():
    with pytest.raises(InvalidArgument) as e:
        jobs.options_of({}, None, 0, 17, jobs.OPENAI_PATHS)
    assert e.value.field == "n"
    with pytest.raises(InvalidArgument) as e:
        jobs.options_of({}, "greedy", 0, 1, jobs.OPENAI_PATHS)
    assert e.value.field == "sampler"
    assert jobs.options_of({}, "fast", 4, 2, jobs.OPENAI_PATHS).params == {"sampler": "fast"}
    names = jobs.field_names("prompt", "max_tokens", jobs.OPENAI_PATHS)
    assert names["t_max"] == "t_max" and names["max_new_tokens"] == "max_tokens" and names["seed"] == "seed"
    assert error_from_triton("INVALID_ARG: t_max: must be >= t_min", names).field == "t_max"
