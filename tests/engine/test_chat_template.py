"""Chat templates render exactly as transformers' apply_chat_template(tokenize=False), and bad messages get clear errors."""
from __future__ import annotations

import json
import re
import shutil

import pytest

import tokenizer_fixtures as fx
from engine.chat_template import ChatTemplate, check_messages
from engine.errors import CheckpointError, InvalidRequestError
from engine.tokenizer import Tokenizer

CONVERSATIONS = {
    "with_system": [
        {"role": "system", "content": "  You are a kind storyteller.  "},
        {"role": "user", "content": "Tell me about the fox."},
        {"role": "assistant", "content": "The fox counted stars: 1, 2, 3 ... 😀"},
        {"role": "user", "content": "And the owl? (café, 日本)"},
    ],
    "no_system": [{"role": "user", "content": "Hi"}],
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {"chatml": fx.build_sentencepiece_dir(root / "sp"), "llama3": fx.build_byte_level_dir(root / "bl")}


@pytest.fixture(scope="module")
def hf(dirs):
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(path) for name, path in dirs.items()}


@pytest.mark.parametrize("style", ["chatml", "llama3"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_matches_transformers(dirs, hf, style, conversation, add_generation_prompt):
    tok = Tokenizer.from_dir(dirs[style])
    messages = CONVERSATIONS[conversation]
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf[style].apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.endswith(("assistant\n", "assistant<|end_header_id|>\n\n")) == add_generation_prompt
    assert tok.encode_chat(messages, add_generation_prompt) == hf[style].encode(theirs, add_special_tokens=False)


def test_chatml_and_llama3_shapes(dirs):
    chatml = Tokenizer.from_dir(dirs["chatml"]).apply_chat_template(CONVERSATIONS["no_system"])
    assert chatml == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    llama3 = Tokenizer.from_dir(dirs["llama3"]).apply_chat_template(CONVERSATIONS["no_system"], add_generation_prompt=False)
    assert llama3 == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_environment_features_match_transformers(hf, add_generation_prompt):
    # Whitespace control, namespace(), loop controls, tojson (non-ASCII, indent), {% generation %}, tools.
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {"city": {"type": "string", "note": "<b> & 'q'"}}}}]
    messages = CONVERSATIONS["with_system"] + [
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "Thanks"},
        {"role": "user", "content": "past the break"},
    ]
    ref = hf["llama3"]
    ours = ChatTemplate(fx.FEATURES_TEMPLATE).render(messages, add_generation_prompt, tools=tools, **ref.special_tokens_map)
    theirs = ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools, chat_template=fx.FEATURES_TEMPLATE
    )
    assert ours == theirs
    assert '"météo"' in ours and "past the break" not in ours


def test_raise_exception_in_template_is_a_request_error(dirs):
    tok = Tokenizer.from_dir(dirs["llama3"])
    with pytest.raises(InvalidRequestError, match="roles must alternate") as info:
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert info.value.param == "messages"


@pytest.mark.parametrize(
    "messages, match, param",
    [
        ([], "non-empty list", "messages"),
        ("hello", "non-empty list", "messages"),
        (["hello"], r"messages\[0\] must be an object", "messages[0]"),
        ([{"content": "hi"}], r"messages\[0\] has no 'role'", "messages[0].role"),
        ([{"role": "user"}], r"messages\[0\] \(user\) has no 'content'", "messages[0].content"),
        ([{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}], r"messages\[1\]\.role must be one of", "messages[1].role"),
        ([{"role": 3, "content": "b"}], r"role must be one of", "messages[0].role"),
        ([{"role": "user", "content": 42}], "must be a string or a list of text parts", "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "only text content", "messages[0].content[0]"),
        ([{"role": "user", "content": "hi", "extra": object()}], "cannot render", "messages[0].extra"),
    ],
)
def test_malformed_messages(dirs, messages, match, param):
    tok = Tokenizer.from_dir(dirs["chatml"])
    with pytest.raises(InvalidRequestError, match=match) as info:
        tok.apply_chat_template(messages)
    assert info.value.param == param


def test_message_normalisation():
    checked = check_messages([
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
    ])
    assert checked[0]["content"] == "one\ntwo"
    assert "content" not in checked[1]  # None values are dropped, as transformers does


def test_no_chat_template_is_a_clear_error(dirs, tmp_path):
    shutil.copy(dirs["chatml"] / "tokenizer.model", tmp_path / "tokenizer.model")
    tok = Tokenizer.from_dir(tmp_path)
    assert not tok.has_chat_template
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tok.apply_chat_template(CONVERSATIONS["no_system"])


def test_chat_template_jinja_file_wins_over_config(dirs, tmp_path):
    shutil.copytree(dirs["chatml"], tmp_path, dirs_exist_ok=True)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(CONVERSATIONS["no_system"]) == "[user]Hi"


def test_named_templates_use_default(dirs, tmp_path):
    shutil.copytree(dirs["chatml"], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages|length }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(CONVERSATIONS["no_system"]) == "D1"


def test_broken_template_names_the_checkpoint(dirs, tmp_path):
    shutil.copytree(dirs["chatml"], tmp_path, dirs_exist_ok=True)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path))):
        Tokenizer.from_dir(tmp_path)


def test_sandbox_blocks_python_internals():
    template = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(InvalidRequestError):
        template.render([{"role": "user", "content": "x"}])
    mutating = ChatTemplate("{% set _ = messages.append(1) %}ok")
    with pytest.raises(InvalidRequestError):
        mutating.render([{"role": "user", "content": "x"}])


def test_strftime_now_and_variables():
    template = ChatTemplate("{{ strftime_now('%Y') }}|{{ enable_thinking }}|{{ bos_token }}")
    out = template.render([{"role": "user", "content": "x"}], enable_thinking=False, bos_token="<s>")
    year, thinking, bos = out.split("|")
    assert re.fullmatch(r"\d{4}", year) and thinking == "False" and bos == "<s>"
