"""Tokenizer: HF files in, ids / text / chat prompts out, with no transformers involved."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from furiosa_runtime.engine.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "Tokenizers turn text into ids and ids back into text.",
    "A neural processing unit runs the model; the host samples tokens.",
]
# Written with one tag per line: correct output relies on trim_blocks / lstrip_blocks.
CHATML_TEMPLATE = """\
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
{{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}
{% endfor %}
{% if add_generation_prompt %}
{{ '<|im_start|>assistant\n' }}
{%- endif %}
"""


def write_tokenizer(directory: Path, **config_overrides: object) -> Path:
    """Train a byte-level BPE on CORPUS and save it like a Hugging Face model folder."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": None,
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE,
        **config_overrides,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(write_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize(
    "text",
    ["Hello world!", "The lazy fox.", "héllo wörld: Grüße, naïve café", "日本語のテキスト 🙂🚀"],
)
def test_encode_decode_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_from_config(tok: Tokenizer) -> None:
    im_end = tok.token_to_id("<|im_end|>")
    assert tok.eos_token == "<|im_end|>"  # AddedToken dict form
    assert tok.eos_token_id == im_end
    assert tok.pad_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.bos_token_id is None
    assert set(tok.all_special_ids) == {tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert tok.vocab_size == len(tok) >= 256 + len(SPECIAL_TOKENS)


def test_special_tokens_encode_as_one_id_and_are_skipped_on_decode(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>user\nHello<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids) == "user\nHello"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHello<|im_end|>"


def test_special_tokens_map_overrides_config(tmp_path: Path) -> None:
    directory = write_tokenizer(tmp_path)
    (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tok = Tokenizer.from_dir(directory)
    assert tok.eos_token_id == tok.token_to_id("<|endoftext|>")


def test_add_bos_token_flag_is_honoured(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(
        write_tokenizer(tmp_path, bos_token="<|endoftext|>", add_bos_token=True)
    )
    bos = tok.bos_token_id
    assert tok.encode("Hello")[0] == bos
    assert tok.encode("Hello", add_special_tokens=False)[0] != bos


def test_chat_template_renders_chatml(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
    ]
    assert tok.has_chat_template
    prompt = tok.apply_chat_template(messages)
    assert prompt == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert without == prompt.removesuffix("<|im_start|>assistant\n")
    ids = tok.apply_chat_template(messages, tokenize=True)
    assert ids == tok.encode(prompt, add_special_tokens=False)


def test_chat_template_raise_exception(tok: Tokenizer) -> None:
    with pytest.raises(jinja2.TemplateError, match="Unknown role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_chat_template_helpers_and_variables(tok: Tokenizer) -> None:
    template = (
        "{{ eos_token }}|{{ strftime_now('%Y') }}|{{ tools | tojson }}|{{ flavour }}"
    )
    rendered = tok.apply_chat_template(
        [], chat_template=template, tools=[{"name": "<f>"}], flavour="x"
    )
    assert rendered == f'<|im_end|>|{datetime.now():%Y}|[{{"name": "<f>"}}]|x'


def test_continue_final_message(tok: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two,"},
    ]
    prompt = tok.apply_chat_template(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    assert prompt.endswith("<|im_start|>assistant\nOne, two,")


def test_missing_chat_template_is_an_error(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(write_tokenizer(tmp_path, chat_template=None))
    assert not tok.has_chat_template
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_errors_are_value_errors(tok: Tokenizer) -> None:
    # raise_exception in a template is a bad request, so callers catching ValueError see it
    with pytest.raises(ValueError, match=r"^chat_template: Unknown role: robot$"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ({"role": "user", "content": "Hi"}, r"^messages: must be a list of"),
        (["Hi"], r"^messages\[0\]: must be a dict with 'role' and 'content', got str"),
        ([{"content": "Hi"}], r"^messages\[0\]\.role: must be a string such as 'user', got None"),
        ([{"role": "user", "content": "Hi"}, {"role": "user"}], r"^messages\[1\]\.content: must be a string or a list of content parts, got None"),
        ([{"role": "user", "content": 5}], r"^messages\[0\]\.content: .* got 5"),
    ],
)
def test_malformed_messages_are_refused_before_rendering(tok: Tokenizer, messages, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        tok.apply_chat_template(messages)


def test_tool_call_messages_may_omit_content(tok: Tokenizer) -> None:
    template = "{% for m in messages %}{{ m['role'] }};{% endfor %}"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}]
    assert tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=False) == "user;assistant;"


def test_unusable_tokenizer_folders_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"^tokenizer: tokenizer.json not found in ") as missing:
        Tokenizer.from_dir(tmp_path / "nowhere")
    assert isinstance(missing.value, FileNotFoundError)  # still what it was before
    broken = write_tokenizer(tmp_path / "broken")
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"^tokenizer: cannot read the tokenizer files in .*broken \(") as info:
        Tokenizer.from_dir(broken)
    assert "\n" not in str(info.value)
    bad_config = write_tokenizer(tmp_path / "bad-config")
    (bad_config / "tokenizer_config.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"^tokenizer: cannot read the tokenizer files"):
        Tokenizer.from_dir(bad_config)


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    """Feed ids one at a time, as an engine does, and collect the deltas."""
    deltas = [detok.add_tokens([i]) for i in ids]
    return deltas + [detok.flush()]


def test_incremental_detokenizer_never_splits_characters(tok: Tokenizer) -> None:
    text = "Grüße 🙂 日本語 and the fox 🚀!"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.encode("utf-8")) // 2  # many byte-level tokens
    detok = IncrementalDetokenizer(tok)
    deltas = stream(detok, ids)
    assert "".join(deltas) == detok.text == text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas[:-1]  # some steps held back half a character
    assert detok.token_ids == ids


def test_incremental_detokenizer_with_prompt_context(tok: Tokenizer) -> None:
    prompt_ids = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    output_ids = tok.encode(" quick 🦊 jumps", add_special_tokens=False) + [tok.eos_token_id]
    detok = IncrementalDetokenizer(tok, prompt_token_ids=prompt_ids)
    assert "".join(stream(detok, output_ids)) == " quick 🦊 jumps"


def test_incremental_detokenizer_flushes_incomplete_tail(tok: Tokenizer) -> None:
    ids = tok.encode("🙂", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    assert detok.add_tokens(ids[:-1]) == ""
    assert detok.flush() == tok.decode(ids[:-1])  # the replacement char, on request
