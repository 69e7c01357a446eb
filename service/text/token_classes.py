"""Token class ids for structured output, without torch (the front uses them to lay out templates).

Part of the request interface (Request.constraints, Triton `constraint_ids`): do not renumber.
The masks that enforce them are in service/sampler/constraints.py.
"""

from service.errors import InvalidArgument

FREE = 0  # no constraint
TEXT = 1  # any token but special ones (pad, eos, bos, `<|turn>`, ...)
JSON_STRING = 2  # non-empty text that may stand inside a JSON string as is: no `"`, `\`, control chars
NUMBER_FIRST = 3  # digits not starting with 0: ^[1-9][0-9]*$
NUMBER_REST = 4  # digits: ^[0-9]+$
NUMBER_WHOLE = 5  # a whole number in one token, zero included: ^(0|[1-9][0-9]*)$
# The two below also allow the pad id, which a slot's text skips: a hole of them holds a shorter value.
JSON_STRING_OR_PAD = 6  # a JSON_STRING piece, or pad
DIGITS_OR_PAD = 7  # a NUMBER_REST piece, or pad
NUM_CLASSES = 8
CLASS_NAMES = ("free", "text", "json_string", "number_first", "number_rest", "number_whole", "json_string_or_pad",
               "digits_or_pad")
# Class ids from NUM_CLASSES on are a request's own choice sets: NUM_CLASSES + j allows the ids of its set j
# (Request.choices, Triton `choice_ids`).


CHOICE_END = -1  # ends each set in `choice_ids`


def choices_of(flat: list[int] | None) -> list[list[int]] | None:
    """`choice_ids`: the request's choice sets, each ended by -1 ([5, 9, -1, 7, -1]: {5, 9} and {7})."""
    if flat is None:
        return None
    if flat[-1:] != [CHOICE_END]:
        raise InvalidArgument("choice_ids", "must end each set with -1")
    sets: list[list[int]] = [[]]
    for i in flat[:-1]:
        sets.append([]) if i == CHOICE_END else sets[-1].append(i)
    return sets


def choice_ids_of(choices: list[list[int]]) -> list[int]:
    """The inverse of choices_of: each set followed by -1."""
    return [i for ids in choices for i in (*ids, CHOICE_END)]
