"""A Hugging Face-compatible tokenizer without transformers.

`Tokenizer` wraps the Rust `tokenizers` library and reads the same files a Hugging Face
model folder (or a built artifact) ships: `tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json` and, in newer exports, `chat_template.jinja` /
`chat_template.json`. Chat templates are rendered the way transformers renders them
(sandboxed Jinja2, `trim_blocks`/`lstrip_blocks`, `raise_exception`, `strftime_now`,
a `tojson` that does not HTML-escape), so prompts are byte-identical to what the model
was trained with.

`IncrementalDetokenizer` turns a stream of generated ids into text deltas without ever
emitting half of a multi-byte character.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from furiosa_runtime.npu.artifact import TOKENIZER_FILES

__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "Tokenizer", "TokenizerError", "require_tokenizer", "validate_messages"]

# Special-token attributes transformers knows, in its order.
SPECIAL_TOKEN_KEYS = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)
_REPLACEMENT_CHAR = "\ufffd"
# How many tokens before the first new one are re-decoded for context (vLLM uses 5).
_DETOKENIZE_CONTEXT = 5


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be used, with the reason in one line."""


class TokenizerNotFoundError(TokenizerError, FileNotFoundError):
    """No ``tokenizer.json`` where one was expected (still a FileNotFoundError, as before)."""


class ChatTemplateError(jinja2.TemplateError, ValueError):
    """Rendering a chat template failed (``raise_exception`` in the template, or a message
    the template cannot handle); a ValueError so callers treat it as a bad request."""


# -- chat template rendering ----------------------------------------------------------


class _GenerationTagExtension(Extension):
    """Accept transformers' `{% generation %}...{% endgeneration %}` blocks.

    transformers uses them to build assistant-token masks; for rendering a prompt the
    block simply outputs its body.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    """Template helper: `{{ raise_exception('...') }}` aborts rendering with a message."""
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """JSON without Jinja's HTML escaping, matching transformers' override."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    """Template helper: current local time formatted with `fmt` (used for dates)."""
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers uses (cached)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTagExtension, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


# -- config reading -------------------------------------------------------------------


def _token_content(value: Any) -> str | None:
    """A special token given as a string or as a serialised AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _json_object(data: bytes | None) -> dict[str, Any]:
    """A JSON file's object, {} for an absent file."""
    value = {} if data is None else json.loads(data.decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _chat_template(files: dict[str, bytes | None], config: dict[str, Any]) -> Any:
    """The chat template: standalone files win over tokenizer_config.json, as in HF."""
    if files["chat_template.jinja"] is not None:
        return files["chat_template.jinja"].decode("utf-8")
    json_file = _json_object(files["chat_template.json"])
    if "chat_template" in json_file:
        return json_file["chat_template"]
    return config.get("chat_template")


def _merge_special_tokens(config: dict[str, Any], special_map: dict[str, Any]) -> dict[str, Any]:
    """Special tokens from tokenizer_config.json, overridden by special_tokens_map.json."""
    merged: dict[str, Any] = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = _token_content(special_map.get(key, config.get(key)))
        if value is not None:
            merged[key] = value
    extra = special_map.get("additional_special_tokens", config.get("additional_special_tokens"))
    merged["additional_special_tokens"] = [
        t for t in (_token_content(v) for v in extra or []) if t is not None
    ]
    return merged


# -- the tokenizer --------------------------------------------------------------------


class Tokenizer:
    """Encode, decode and chat-format text for one model, without transformers.

    Build it with `Tokenizer.from_dir(path)` (or `from_files`); `config` is the parsed
    `tokenizer_config.json` (special tokens as strings or AddedToken dicts,
    `chat_template`, optional `add_bos_token` / `add_eos_token`).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        config: dict[str, Any] | None = None,
        special_tokens_map: dict[str, Any] | None = None,
        chat_template: str | list[dict[str, str]] | None = None,
    ) -> None:
        self.backend = backend
        config = dict(config or {})
        self.config = config
        self.special_tokens = _merge_special_tokens(config, special_tokens_map or {})
        template = chat_template if chat_template is not None else config.get("chat_template")
        self._chat_templates = _named_templates(template)
        self._add_bos: bool | None = config.get("add_bos_token")
        self._add_eos: bool | None = config.get("add_eos_token")
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.model_max_length: int | None = config.get("model_max_length")

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer files of a Hugging Face model folder.

        A missing or unreadable file is a one-line `TokenizerError` naming it, not the
        JSON or Rust error from deep inside.  (An artifact's tokenizer is read through
        its verified reader instead: `from_files`.)
        """
        directory = Path(path)

        def read(name: str) -> bytes | None:
            file = directory / name
            try:
                return file.read_bytes() if file.is_file() else None
            except OSError as err:
                raise TokenizerError(f"tokenizer: cannot read {file} ({err.strerror})") from None

        return cls.from_files(read, str(directory))

    @classmethod
    def from_files(cls, read: Callable[[str], bytes | None], where: str) -> Tokenizer:
        """Build the tokenizer from file contents: ``read(name)`` returns the bytes of
        ``tokenizer.json``, ``tokenizer_config.json``, ... or None when there is no such file.

        Nothing is opened here, so the caller decides what may be read (an artifact hands
        in its manifest-checked reader); ``where`` names the source in errors.
        """
        files = {name: read(name) for name in TOKENIZER_FILES}
        if files["tokenizer.json"] is None:
            raise TokenizerNotFoundError(f"tokenizer: tokenizer.json not found in {where}")
        try:
            config = _json_object(files["tokenizer_config.json"])
            special_tokens_map = _json_object(files["special_tokens_map.json"])
            chat_template = _chat_template(files, config)
            backend = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        except Exception as err:  # JSON, UTF-8 and the Rust library's own errors
            line = " ".join(str(err).split())
            raise TokenizerError(f"tokenizer: cannot read the tokenizer files in {where} ({line})") from None
        return cls(backend, config=config, special_tokens_map=special_tokens_map, chat_template=chat_template)

    # -- special tokens ---------------------------------------------------------------

    def _special_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named special tokens plus every added token flagged special.

        Wider than transformers (which lists only the named ones) because this is the
        set `decode(skip_special_tokens=True)` drops.
        """
        named = [self.special_tokens[k] for k in SPECIAL_TOKEN_KEYS if k in self.special_tokens]
        named += self.special_tokens["additional_special_tokens"]
        ids = {self.backend.token_to_id(t) for t in named}
        ids |= {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        ids.discard(None)  # type: ignore[arg-type]
        return sorted(ids)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # -- encode / decode ----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens are added by the tokenizer's post-processor.

        When tokenizer_config.json sets `add_bos_token` / `add_eos_token` (Llama-style
        configs), those flags decide whether BOS / EOS are added, as in transformers.
        """
        # encode_batch, unlike encode, lets go of the GIL while it works: a server tokenizing a
        # long prompt in a worker thread keeps its event loop running
        [encoding] = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)
        ids = list(encoding.ids)
        if add_special_tokens:
            ids = self._apply_bos_eos_flags(ids, list(encoding.special_tokens_mask))
        return ids

    def _apply_bos_eos_flags(self, ids: list[int], added_mask: list[int]) -> list[int]:
        """Add or drop post-processor BOS/EOS to honour explicit config flags."""
        bos, eos = self.bos_token_id, self.eos_token_id
        if self._add_bos is not None and bos is not None:
            has_bos = bool(ids) and ids[0] == bos and added_mask[0] == 1
            if self._add_bos and not has_bos:
                ids, added_mask = [bos, *ids], [1, *added_mask]
            elif not self._add_bos and has_bos:
                ids, added_mask = ids[1:], added_mask[1:]
        if self._add_eos is not None and eos is not None:
            has_eos = bool(ids) and ids[-1] == eos and added_mask[-1] == 1
            if self._add_eos and not has_eos:
                ids = [*ids, eos]
            elif not self._add_eos and has_eos:
                ids = ids[:-1]
        return ids

    def decode(self, ids: Sequence[int] | int, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; incomplete UTF-8 sequences come out as U+FFFD."""
        if isinstance(ids, int):
            ids = [ids]
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.clean_up_tokenization_spaces else text

    # -- chat templates -----------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(self._chat_templates)

    @property
    def chat_template(self) -> str | None:
        """The default chat template source, or None."""
        return self._chat_templates.get("default") or next(iter(self._chat_templates.values()), None)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        *,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the chat template; token ids when `tokenize=True`.

        `chat_template` may be a template source or the name of one of the model's named
        templates; extra keyword arguments (e.g. `enable_thinking`) reach the template.
        Tokenizing never adds special tokens: the template already contains them.
        """
        if add_generation_prompt and continue_final_message:
            raise ValueError(
                "continue_final_message: cannot be combined with add_generation_prompt=True"
            )
        validate_messages(messages)
        template = compile_chat_template(self._select_template(chat_template, tools))
        variables = {**self.special_tokens, **template_kwargs}
        try:
            rendered = template.render(
                messages=messages,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as err:
            raise ChatTemplateError(f"chat_template: {' '.join(str(err).split())}") from None
        if continue_final_message:
            rendered = _cut_after_final_message(rendered, messages)
        return self.encode(rendered, add_special_tokens=False) if tokenize else rendered

    def _select_template(self, chat_template: str | None, tools: list[Any] | None) -> str:
        """Pick a template by explicit source, by name, or the default (tool_use w/ tools)."""
        if chat_template is not None:
            return self._chat_templates.get(chat_template, chat_template)
        if tools and "tool_use" in self._chat_templates:
            return self._chat_templates["tool_use"]
        template = self.chat_template
        if template is None:
            raise ValueError(
                "chat_template: this tokenizer has none; pass chat_template=... explicitly"
            )
        return template


def require_tokenizer(tokenizer: Tokenizer | None, what: str) -> Tokenizer:
    """``tokenizer``, or a one-line ValueError naming ``what`` needed one: an artifact
    built without tokenizer files takes token-id prompts only."""
    if tokenizer is None:
        raise ValueError(f"{what}: this artifact has no tokenizer; pass token ids ({{'prompt_token_ids': [...]}})")
    return tokenizer


def validate_messages(messages: Any, name: str = "messages") -> None:
    """Raise a one-line ValueError unless `messages` is a list of chat messages.

    Each message is a dict with a string ``role`` and a ``content`` that is a string or a
    list of content parts (it may be absent or None only beside ``tool_calls``).  Without
    this a template fails deep inside Jinja ("'dict object' has no attribute 'role'").
    `name` is how the error refers to the list (``messages[1]`` for a batch's second).
    """
    if not isinstance(messages, list | tuple):
        raise ValueError(f"{name}: must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where}: must be a dict with 'role' and 'content', got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"{where}.role: must be a string such as 'user', got {message.get('role')!r}")
        content = message.get("content")
        if not (isinstance(content, str | list) or (content is None and message.get("tool_calls"))):
            raise ValueError(f"{where}.content: must be a string or a list of content parts, got {content!r}")


def _named_templates(template: str | list[dict[str, str]] | None) -> dict[str, str]:
    """Normalise a chat template (a string or HF's list of {name, template}) to a dict."""
    if template is None:
        return {}
    if isinstance(template, str):
        return {"default": template}
    return {entry["name"]: entry["template"] for entry in template}


def _cut_after_final_message(rendered: str, messages: list[dict[str, Any]]) -> str:
    """Drop whatever the template appends after the last message (end-of-turn tokens)."""
    content = messages[-1].get("content") if messages else None
    if isinstance(content, list):  # multimodal-style content parts: use the last text part
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and "text" in p]
        content = texts[-1] if texts else None
    if not isinstance(content, str) or not content.strip():
        raise ValueError("continue_final_message: the final message has no text content")
    end = rendered.rindex(content.strip()) + len(content.strip())
    return rendered[:end]


def _clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization`: glue punctuation and contractions back."""
    for before, after in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
        (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


# -- streaming detokenization ---------------------------------------------------------


class IncrementalDetokenizer:
    """Turn a growing list of generated ids into text deltas, one step at a time.

    Each step re-decodes a short window (a few previous tokens plus the new ones) and
    emits the part of the text that is new. A window ending in U+FFFD means a multi-byte
    character is still incomplete, so the text is held back until the next token
    completes it; `flush()` releases whatever is left when the request finishes.
    Passing the prompt ids gives the first generated token its left context (so a
    leading space survives, as in vLLM).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids or [])
        self._num_prompt = len(self._ids)
        self._read_offset = self._num_prompt
        self._prefix_offset = max(self._num_prompt - _DETOKENIZE_CONTEXT, 0)
        self.text = ""

    @property
    def token_ids(self) -> list[int]:
        """The generated ids seen so far (prompt excluded)."""
        return self._ids[self._num_prompt :]

    def add_tokens(self, new_token_ids: Iterable[int]) -> str:
        """Append generated ids; return the newly completed text (possibly "")."""
        self._ids.extend(new_token_ids)
        delta = self._decode_delta(final=False)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Return any held-back text, including a trailing incomplete character."""
        delta = self._decode_delta(final=True)
        self.text += delta
        return delta

    def _decode_delta(self, final: bool) -> str:
        window = self._ids[self._prefix_offset :]
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(window)
        if len(full_text) <= len(prefix_text):
            return ""
        if full_text.endswith(_REPLACEMENT_CHAR) and not final:
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
