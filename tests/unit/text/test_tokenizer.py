"""Tokenizer wrapper: BOS, decoding, and chat prompts from the checkpoint's template or the Gemma format."""

import json

import pytest

from service.errors import CheckpointError, InvalidArgument
from service.text import tokenizer as tokenizer_module
from service.text.tokenizer import load_tokenizer
from tools.tiny_model.tokenizer import train_tokenizer

TEXTS = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "user model hello world"] * 20


@pytest.fixture()
def ckpt(tmp_path):
    tok = train_tokenizer(TEXTS, 300)
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    return tmp_path


def test_encode_decode_with_bos(ckpt):
    tok = load_tokenizer(ckpt)
    ids = tok.encode("def f(x):")
    assert ids[0] == 2 and tok.decode(ids) == "def f(x):"


def test_builtin_gemma_turn_format(ckpt):
    tok = load_tokenizer(ckpt)
    text = tok.decode(tok.chat_prompt([("user", "hello")]), skip_special=False)
    assert text == "<bos><|turn>user\nhello<turn|>\n<|turn>model\n"


def test_checkpoint_chat_template_wins(ckpt):
    (ckpt / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}[model]{% endif %}")
    tok = load_tokenizer(ckpt)
    text = tok.decode(tok.chat_prompt([("user", "hello")]), skip_special=False)
    assert text == "<bos>[user]hello[model]"


def test_broken_template_is_a_checkpoint_error(ckpt):
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(CheckpointError, match="chat template"):
        load_tokenizer(ckpt).chat_prompt([("user", "x")])


def test_template_raise_exception_is_the_clients_error_and_compiles_once(ckpt, monkeypatch):
    """Real chat templates call raise_exception for conversations they refuse (roles that don't alternate):
    that is an InvalidArgument with the template's message, not a server fault; the template compiles once."""
    (ckpt / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/model/user/model/...') }}{% endif %}"
        "[{{ m.role }}]{{ m.content }}{% endfor %}[model]")
    compiled = []
    real = tokenizer_module._compile
    monkeypatch.setattr(tokenizer_module, "_compile", lambda t: compiled.append(t) or real(t))
    tok = load_tokenizer(ckpt)
    with pytest.raises(InvalidArgument, match="roles must alternate") as e:
        tok.chat_prompt([("user", "a"), ("user", "b")])
    assert e.value.field == "messages"
    for _ in range(3):
        assert tok.decode(tok.chat_prompt([("user", "a"), ("model", "b")]), skip_special=False).endswith("[model]")
    assert len(compiled) == 1
