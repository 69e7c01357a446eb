"""Token class ids for structured output, without torch (the front uses them to lay out templates).

Part of the request interface (Request.constraints, Triton `constraint_ids`): do not renumber.
The masks that enforce them are in service/sampler/constraints.py.
"""

FREE = 0  # no constraint
TEXT = 1  # any token but special ones (pad, eos, bos, `<|turn>`, ...)
JSON_STRING = 2  # non-empty text that may stand inside a JSON string as is: no `"`, `\`, control chars
NUMBER_FIRST = 3  # digits not starting with 0: ^[1-9][0-9]*$
NUMBER_REST = 4  # digits: ^[0-9]+$
NUMBER_WHOLE = 5  # a whole number in one token, zero included: ^(0|[1-9][0-9]*)$
NUM_CLASSES = 6
CLASS_NAMES = ("free", "text", "json_string", "number_first", "number_rest", "number_whole")
