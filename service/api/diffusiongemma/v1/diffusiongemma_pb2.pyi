from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sampler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLER_UNSPECIFIED: _ClassVar[Sampler]
    SAMPLER_REFERENCE: _ClassVar[Sampler]
    SAMPLER_FAST: _ClassVar[Sampler]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]

class HoleType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HOLE_TYPE_UNSPECIFIED: _ClassVar[HoleType]
    HOLE_TYPE_TEXT: _ClassVar[HoleType]
    HOLE_TYPE_STRING: _ClassVar[HoleType]
    HOLE_TYPE_NUMBER: _ClassVar[HoleType]
SAMPLER_UNSPECIFIED: Sampler
SAMPLER_REFERENCE: Sampler
SAMPLER_FAST: Sampler
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
HOLE_TYPE_UNSPECIFIED: HoleType
HOLE_TYPE_TEXT: HoleType
HOLE_TYPE_STRING: HoleType
HOLE_TYPE_NUMBER: HoleType

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Chat(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DiffusionParameters(_message.Message):
    __slots__ = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold", "confidence_threshold", "sampler", "temperature", "top_k")
    MAX_DENOISING_STEPS_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_BOUND_FIELD_NUMBER: _ClassVar[int]
    T_MIN_FIELD_NUMBER: _ClassVar[int]
    T_MAX_FIELD_NUMBER: _ClassVar[int]
    STABILITY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    max_denoising_steps: int
    entropy_bound: float
    t_min: float
    t_max: float
    stability_threshold: int
    confidence_threshold: float
    sampler: Sampler
    temperature: float
    top_k: int
    def __init__(self, max_denoising_steps: _Optional[int] = ..., entropy_bound: _Optional[float] = ..., t_min: _Optional[float] = ..., t_max: _Optional[float] = ..., stability_threshold: _Optional[int] = ..., confidence_threshold: _Optional[float] = ..., sampler: _Optional[_Union[Sampler, str]] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_prompt_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_prompt_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ...) -> None: ...

class DiffusionStats(_message.Message):
    __slots__ = ("decoder_passes", "steps_per_canvas", "tokens_per_forward", "shared_decoder_passes")
    DECODER_PASSES_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_CANVAS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_FORWARD_FIELD_NUMBER: _ClassVar[int]
    SHARED_DECODER_PASSES_FIELD_NUMBER: _ClassVar[int]
    decoder_passes: int
    steps_per_canvas: _containers.RepeatedScalarFieldContainer[int]
    tokens_per_forward: float
    shared_decoder_passes: int
    def __init__(self, decoder_passes: _Optional[int] = ..., steps_per_canvas: _Optional[_Iterable[int]] = ..., tokens_per_forward: _Optional[float] = ..., shared_decoder_passes: _Optional[int] = ...) -> None: ...

class GenerationOptions(_message.Message):
    __slots__ = ("parameters", "seed", "num_variations")
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_VARIATIONS_FIELD_NUMBER: _ClassVar[int]
    parameters: DiffusionParameters
    seed: int
    num_variations: int
    def __init__(self, parameters: _Optional[_Union[DiffusionParameters, _Mapping]] = ..., seed: _Optional[int] = ..., num_variations: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "text", "chat", "token_ids", "max_new_tokens", "options", "return_drafts", "request_id", "stop", "stop_token_ids", "ignore_eos")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    RETURN_DRAFTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    model: str
    text: str
    chat: Chat
    token_ids: TokenIds
    max_new_tokens: int
    options: GenerationOptions
    return_drafts: bool
    request_id: str
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    def __init__(self, model: _Optional[str] = ..., text: _Optional[str] = ..., chat: _Optional[_Union[Chat, _Mapping]] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ..., return_drafts: _Optional[bool] = ..., request_id: _Optional[str] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class Choice(_message.Message):
    __slots__ = ("index", "text", "token_ids", "finish_reason", "seed", "stats", "stop_sequence", "stop_token_id")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    seed: int
    stats: DiffusionStats
    stop_sequence: str
    stop_token_id: int
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., seed: _Optional[int] = ..., stats: _Optional[_Union[DiffusionStats, _Mapping]] = ..., stop_sequence: _Optional[str] = ..., stop_token_id: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "model", "choices", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    choices: _containers.RepeatedCompositeFieldContainer[Choice]
    usage: Usage
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., choices: _Optional[_Iterable[_Union[Choice, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class Draft(_message.Message):
    __slots__ = ("variation", "canvas_index", "step", "text", "token_ids")
    VARIATION_FIELD_NUMBER: _ClassVar[int]
    CANVAS_INDEX_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    variation: int
    canvas_index: int
    step: int
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, variation: _Optional[int] = ..., canvas_index: _Optional[int] = ..., step: _Optional[int] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class CommittedCanvas(_message.Message):
    __slots__ = ("variation", "canvas_index", "steps", "text", "token_ids")
    VARIATION_FIELD_NUMBER: _ClassVar[int]
    CANVAS_INDEX_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    variation: int
    canvas_index: int
    steps: int
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, variation: _Optional[int] = ..., canvas_index: _Optional[int] = ..., steps: _Optional[int] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("request_id", "draft", "canvas", "final")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    CANVAS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    draft: Draft
    canvas: CommittedCanvas
    final: GenerateResponse
    def __init__(self, request_id: _Optional[str] = ..., draft: _Optional[_Union[Draft, _Mapping]] = ..., canvas: _Optional[_Union[CommittedCanvas, _Mapping]] = ..., final: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class InfillRequest(_message.Message):
    __slots__ = ("model", "prefix", "suffix", "gap_tokens", "options", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    SUFFIX_FIELD_NUMBER: _ClassVar[int]
    GAP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    prefix: str
    suffix: str
    gap_tokens: int
    options: GenerationOptions
    request_id: str
    def __init__(self, model: _Optional[str] = ..., prefix: _Optional[str] = ..., suffix: _Optional[str] = ..., gap_tokens: _Optional[int] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class InfillChoice(_message.Message):
    __slots__ = ("index", "infill", "text", "infill_token_ids", "seed", "stats")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    INFILL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INFILL_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    index: int
    infill: str
    text: str
    infill_token_ids: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    stats: DiffusionStats
    def __init__(self, index: _Optional[int] = ..., infill: _Optional[str] = ..., text: _Optional[str] = ..., infill_token_ids: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ..., stats: _Optional[_Union[DiffusionStats, _Mapping]] = ...) -> None: ...

class InfillResponse(_message.Message):
    __slots__ = ("request_id", "model", "choices", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    choices: _containers.RepeatedCompositeFieldContainer[InfillChoice]
    usage: Usage
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., choices: _Optional[_Iterable[_Union[InfillChoice, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class Span(_message.Message):
    __slots__ = ("start", "end", "length_tokens")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    LENGTH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    length_tokens: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., length_tokens: _Optional[int] = ...) -> None: ...

class EditRequest(_message.Message):
    __slots__ = ("model", "text", "editable", "instruction", "options", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    EDITABLE_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    text: str
    editable: _containers.RepeatedCompositeFieldContainer[Span]
    instruction: str
    options: GenerationOptions
    request_id: str
    def __init__(self, model: _Optional[str] = ..., text: _Optional[str] = ..., editable: _Optional[_Iterable[_Union[Span, _Mapping]]] = ..., instruction: _Optional[str] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class EditChoice(_message.Message):
    __slots__ = ("index", "text", "replacements", "seed", "stats")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REPLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    replacements: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    stats: DiffusionStats
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., replacements: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., stats: _Optional[_Union[DiffusionStats, _Mapping]] = ...) -> None: ...

class EditResponse(_message.Message):
    __slots__ = ("request_id", "model", "choices", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    choices: _containers.RepeatedCompositeFieldContainer[EditChoice]
    usage: Usage
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., choices: _Optional[_Iterable[_Union[EditChoice, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class Hole(_message.Message):
    __slots__ = ("name", "type", "length_tokens")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    LENGTH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: HoleType
    length_tokens: int
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[HoleType, str]] = ..., length_tokens: _Optional[int] = ...) -> None: ...

class TemplatePart(_message.Message):
    __slots__ = ("literal", "hole")
    LITERAL_FIELD_NUMBER: _ClassVar[int]
    HOLE_FIELD_NUMBER: _ClassVar[int]
    literal: str
    hole: Hole
    def __init__(self, literal: _Optional[str] = ..., hole: _Optional[_Union[Hole, _Mapping]] = ...) -> None: ...

class TemplateRequest(_message.Message):
    __slots__ = ("model", "parts", "skeleton", "instruction", "options", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    SKELETON_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    parts: _containers.RepeatedCompositeFieldContainer[TemplatePart]
    skeleton: str
    instruction: str
    options: GenerationOptions
    request_id: str
    def __init__(self, model: _Optional[str] = ..., parts: _Optional[_Iterable[_Union[TemplatePart, _Mapping]]] = ..., skeleton: _Optional[str] = ..., instruction: _Optional[str] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class TemplateChoice(_message.Message):
    __slots__ = ("index", "text", "values", "named_values", "seed", "stats")
    class NamedValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    NAMED_VALUES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    values: _containers.RepeatedScalarFieldContainer[str]
    named_values: _containers.ScalarMap[str, str]
    seed: int
    stats: DiffusionStats
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ..., named_values: _Optional[_Mapping[str, str]] = ..., seed: _Optional[int] = ..., stats: _Optional[_Union[DiffusionStats, _Mapping]] = ...) -> None: ...

class TemplateResponse(_message.Message):
    __slots__ = ("request_id", "model", "choices", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    choices: _containers.RepeatedCompositeFieldContainer[TemplateChoice]
    usage: Usage
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., choices: _Optional[_Iterable[_Union[TemplateChoice, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("model", "context_text", "context_ids", "continuation_text", "continuation_ids", "score_samples", "seed", "top_logprobs", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TEXT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_IDS_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_TEXT_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    context_text: str
    context_ids: TokenIds
    continuation_text: str
    continuation_ids: TokenIds
    score_samples: int
    seed: int
    top_logprobs: int
    request_id: str
    def __init__(self, model: _Optional[str] = ..., context_text: _Optional[str] = ..., context_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., continuation_text: _Optional[str] = ..., continuation_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., score_samples: _Optional[int] = ..., seed: _Optional[int] = ..., top_logprobs: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "token", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token: str
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., token: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class ScoredToken(_message.Message):
    __slots__ = ("token_id", "token", "logprob", "top_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token: str
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, token_id: _Optional[int] = ..., token: _Optional[str] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "model", "tokens", "total_logprob", "score_samples", "seed", "stats", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    SCORE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    tokens: _containers.RepeatedCompositeFieldContainer[ScoredToken]
    total_logprob: float
    score_samples: int
    seed: int
    stats: DiffusionStats
    usage: Usage
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[ScoredToken, _Mapping]]] = ..., total_logprob: _Optional[float] = ..., score_samples: _Optional[int] = ..., seed: _Optional[int] = ..., stats: _Optional[_Union[DiffusionStats, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("model", "text", "chat")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    model: str
    text: str
    chat: Chat
    def __init__(self, model: _Optional[str] = ..., text: _Optional[str] = ..., chat: _Optional[_Union[Chat, _Mapping]] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("token_ids", "tokens")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("id", "canvas_length", "vocab_size", "profile", "default_parameters", "default_max_new_tokens")
    ID_FIELD_NUMBER: _ClassVar[int]
    CANVAS_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    id: str
    canvas_length: int
    vocab_size: int
    profile: str
    default_parameters: DiffusionParameters
    default_max_new_tokens: int
    def __init__(self, id: _Optional[str] = ..., canvas_length: _Optional[int] = ..., vocab_size: _Optional[int] = ..., profile: _Optional[str] = ..., default_parameters: _Optional[_Union[DiffusionParameters, _Mapping]] = ..., default_max_new_tokens: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
