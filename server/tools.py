"""Tool calling on /v1/chat/completions: prompts, forced-call grammars, and parsing the model's calls.

Prompt side. Tools reach the model's chat template as `tools=` (as transformers passes them). A
template that never reads `tools` gets them in a system message instead, in this documented
format (Hermes', which many small models have seen):

    You may call these functions. To call one, answer with
    <tool_call>{"name": <function name>, "arguments": <arguments as a JSON object>}</tool_call>
    (one block per call) and nothing else.
    <tools>
    {"type": "function", "function": {...}}
    </tools>

Such a template also gets earlier assistant `tool_calls` written into the message text in that
same format, and `role: tool` results as user messages wrapped in <tool_response>...</tool_response>.
Mistral's templates take only tool-call ids of 9 letters and digits (they raise on any other): for
them the server makes such ids, and a replayed history's other ids are mapped to 9 characters
(the same id always to the same 9, so a call and its result still pair up).

Output side. With tool_choice "auto" the reply is parsed for calls in the format the template
uses: Hermes / Qwen `<tool_call>{json}</tool_call>`, Llama 3.1 JSON (`{"name", "parameters"}`,
optionally after `<|python_tag|>`, or `<|python_tag|>name.call(k=v)`), Mistral `[TOOL_CALLS][{...}]`
or `[TOOL_CALLS]name[ARGS]{...}`. With "required" or a named function the output is constrained by
a grammar (guidance.py): a named function's arguments object, or for "required" a JSON array of
`{"name", "arguments"}` objects, one item unless parallel_tool_calls.
"""
from __future__ import annotations

import ast
import hashlib
import json
import re
import secrets
import string
import uuid
from dataclasses import dataclass
from typing import Any

from mistralrs_jax.errors import InvalidRequestError
from mistralrs_jax.guidance import GuidedDecoding

HERMES, LLAMA3, MISTRAL = "hermes", "llama3", "mistral"
_MARKERS = {HERMES: ("<tool_call>",), LLAMA3: ("<|python_tag|>", "{"), MISTRAL: ("[TOOL_CALLS]",)}

TOOL_SYSTEM_PROMPT = (
    "You may call these functions. To call one, answer with\n"
    "<tool_call>{{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}}</tool_call>\n"
    "(one block per call) and nothing else.\n<tools>\n{tools}\n</tools>"
)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def __post_init__(self):
        self.id = self.id or new_call_id()

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


MISTRAL_ID_LENGTH = 9
_ALNUM = string.ascii_letters + string.digits


def new_call_id(fmt: str = HERMES) -> str:
    """A fresh tool-call id in the form the template family takes back when the history is replayed."""
    if fmt == MISTRAL:
        return "".join(secrets.choice(_ALNUM) for _ in range(MISTRAL_ID_LENGTH))
    return f"call_{uuid.uuid4().hex[:24]}"


def with_ids(calls: list[ToolCall], fmt: str) -> list[ToolCall]:
    """The calls with ids of `fmt`'s form (new ones where the form differs)."""
    if fmt == MISTRAL:
        for call in calls:
            if not _fits_mistral(call.id):
                call.id = new_call_id(MISTRAL)
    return calls


def _fits_mistral(call_id: Any) -> bool:
    return isinstance(call_id, str) and len(call_id) == MISTRAL_ID_LENGTH and call_id.isascii() and call_id.isalnum()


def _mistral_id(call_id: Any) -> Any:
    """An id of 9 letters and digits standing for `call_id` (unchanged if it is one already)."""
    if not isinstance(call_id, str) or _fits_mistral(call_id):
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()[:MISTRAL_ID_LENGTH]


# ----------------------------------------------------------------------------- request side


def check_tools(tools: list[dict[str, Any]] | None, tool_choice: Any) -> str | None:
    """Validate tools / tool_choice; return the mode: None (no tools), "auto", "required" or the forced name."""
    for index, tool in enumerate(tools or ()):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise InvalidRequestError('each tool must be {"type": "function", "function": {"name": ...}}',
                                      param=f"tools[{index}]")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidRequestError("a tool function needs a non-empty name", param=f"tools[{index}].function.name")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise InvalidRequestError("function parameters must be a JSON Schema object",
                                      param=f"tools[{index}].function.parameters")
    names = [tool["function"]["name"] for tool in tools or ()]
    if tool_choice is None:
        return "auto" if names else None
    if tool_choice == "none":
        return None
    if tool_choice in ("auto", "required"):
        if not names:
            if tool_choice == "auto":
                return None
            raise InvalidRequestError('tool_choice "required" needs tools', param="tool_choice")
        return tool_choice
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if tool_choice.get("type", "function") == "function" and isinstance(name, str):
            if name not in names:
                raise InvalidRequestError(f"tool_choice names function {name!r}, which is not among the tools "
                                          f"({', '.join(names) or 'none given'})", param="tool_choice")
            return name
    raise InvalidRequestError('tool_choice must be "none", "auto", "required" or {"type": "function", '
                              '"function": {"name": ...}}', param="tool_choice")


def _parameters(tools: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for tool in tools:
        if tool["function"]["name"] == name:
            return tool["function"].get("parameters") or {"type": "object"}
    raise KeyError(name)


def forced_call_constraint(tools: list[dict[str, Any]], mode: str, parallel: bool) -> GuidedDecoding | None:
    """The grammar that makes the output a call (None for mode "auto")."""
    if mode == "auto":
        return None
    if mode != "required":  # a named function: its arguments object
        return GuidedDecoding("json_schema", _parameters(tools, mode), param="tool_choice")
    choices = [{"type": "object", "properties": {"name": {"const": tool["function"]["name"]},
                                                 "arguments": tool["function"].get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False} for tool in tools]
    schema: dict[str, Any] = {"type": "array", "items": {"anyOf": choices}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return GuidedDecoding("json_schema", schema, param="tool_choice")


def forced_calls(text: str, mode: str) -> list[ToolCall] | None:
    """The calls in the output of a forced (grammar-constrained) generation, or None if it is incomplete."""
    if mode != "required":
        try:
            json.loads(text)
        except json.JSONDecodeError:
            return None
        return [ToolCall(mode, text)]
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return None
    return [ToolCall(item["name"], json.dumps(item["arguments"], ensure_ascii=False)) for item in items]


def call_format(template_source: str) -> str:
    """Which output format a chat template teaches the model (Hermes when it teaches none)."""
    if "[TOOL_CALLS]" in template_source:
        return MISTRAL
    if "<|python_tag|>" in template_source or "ipython" in template_source:
        return LLAMA3
    return HERMES


def messages_for_template(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                          template_reads_tools: bool, fmt: str = HERMES) -> list[dict[str, Any]]:
    """Messages as a template that does not know tools can render them (see the module docstring);
    for one that does, unchanged but for tool-call ids a Mistral template would refuse."""
    if template_reads_tools:
        return _fit_mistral_ids(messages) if fmt == MISTRAL else messages
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            blocks = [_hermes_block(call) for call in message.pop("tool_calls")]
            message["content"] = "\n".join(filter(None, [_text(message.get("content"))] + blocks))
        elif message.get("role") in ("tool", "function"):
            message = {"role": "user", "content": f"<tool_response>\n{_text(message.get('content'))}\n</tool_response>"}
        out.append(message)
    if tools:
        listing = TOOL_SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{_text(out[0].get('content'))}\n\n{listing}"}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out


def _fit_mistral_ids(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for message in messages:
        if message.get("tool_calls"):
            message = {**message, "tool_calls": [{**call, "id": _mistral_id(call.get("id"))} if isinstance(call, dict)
                                                 else call for call in message["tool_calls"]]}
        if "tool_call_id" in message:
            message = {**message, "tool_call_id": _mistral_id(message["tool_call_id"])}
        out.append(message)
    return out


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def _hermes_block(call: dict[str, Any]) -> str:
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    body = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>{body}</tool_call>"


# ----------------------------------------------------------------------------- output side


def parse_tool_calls(text: str, fmt: str) -> tuple[str | None, list[ToolCall]]:
    """(content before the calls or None, calls) from a free ("auto") reply; no calls -> (text, [])."""
    start = _marker_start(text, fmt)
    if start is None:
        return text, []
    calls = {HERMES: _parse_hermes, LLAMA3: _parse_llama3, MISTRAL: _parse_mistral}[fmt](text[start:])
    if not calls:
        return text, []
    content = text[:start].strip()
    return content or None, calls


def _marker_start(text: str, fmt: str) -> int | None:
    if fmt == LLAMA3:
        tag = text.find("<|python_tag|>")
        if tag >= 0:
            return tag
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith("{") else None
    index = text.find(_MARKERS[fmt][0])
    return index if index >= 0 else None


def _call_from_object(item: Any) -> ToolCall | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):
        return ToolCall(item["name"], arguments)
    return ToolCall(item["name"], json.dumps(arguments, ensure_ascii=False))


def _parse_hermes(text: str) -> list[ToolCall]:
    calls = []
    for match in re.finditer(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text, re.S):
        try:
            call = _call_from_object(json.loads(match.group(1)))
        except json.JSONDecodeError:
            return []
        if call is None:
            return []
        calls.append(call)
    return calls


def _parse_json_calls(text: str) -> list[ToolCall]:
    """One JSON object, a JSON list of them, or objects separated by ';' (Llama 3.1's parallel form)."""
    text = text.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = [json.loads(part) for part in text.split(";") if part.strip()]
        except json.JSONDecodeError:
            return []
    items = value if isinstance(value, list) else [value]
    calls = [_call_from_object(item) for item in items]
    return [] if not calls or None in calls else calls  # type: ignore[return-value]


def _parse_llama3(text: str) -> list[ToolCall]:
    if text.startswith("<|python_tag|>"):
        body = text[len("<|python_tag|>"):].split("<|eom_id|>")[0].strip()
        calls = _parse_json_calls(body)
        return calls or _parse_python_call(body)
    return _parse_json_calls(text)


def _parse_python_call(text: str) -> list[ToolCall]:
    """Llama 3.1's built-in tool form: `brave_search.call(query="...")`."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return []
    if not isinstance(node, ast.Call) or node.args:
        return []
    func = node.func
    name = func.value.id if (isinstance(func, ast.Attribute) and func.attr == "call"
                             and isinstance(func.value, ast.Name)) else func.id if isinstance(func, ast.Name) else None
    if name is None:
        return []
    try:
        arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except ValueError:
        return []
    return [ToolCall(name, json.dumps(arguments, ensure_ascii=False))]


def _parse_mistral(text: str) -> list[ToolCall]:
    body = text[len("[TOOL_CALLS]"):].strip()
    if "[ARGS]" in body:  # newer tokenizers: [TOOL_CALLS]name[ARGS]{...}, repeated
        calls = []
        for part in body.split("[TOOL_CALLS]"):
            name, _, arguments = part.partition("[ARGS]")
            try:
                json.loads(arguments)
            except json.JSONDecodeError:
                return []
            calls.append(ToolCall(name.strip(), arguments.strip()))
        return calls
    return _parse_json_calls(body)


class ToolStreamFilter:
    """Streams a free ("auto") reply's text while it cannot be a tool call, and holds the rest.

    `feed(text)` returns the text that is safe to send as content now; `finish()` returns
    (content still to send, calls) once the reply is complete.
    """

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.text = ""
        self.sent = 0
        self.holding = False

    def feed(self, text: str) -> str:
        self.text += text
        if self.holding:
            return ""
        if _marker_start(self.text, self.fmt) is not None:
            self.holding = True
            start = _marker_start(self.text, self.fmt)
            out, self.sent = self.text[self.sent:start], start
            return out
        safe = len(self.text) - self._partial_marker()
        if self.fmt == LLAMA3 and not self.text.strip():
            safe = self.sent  # a reply may still open with "{"
        out, self.sent = self.text[self.sent:safe], max(self.sent, safe)
        return out

    def _partial_marker(self) -> int:
        """Length of the longest suffix of the text that begins a marker."""
        longest = 0
        for marker in _MARKERS[self.fmt]:
            for size in range(1, len(marker)):
                if self.text.endswith(marker[:size]):
                    longest = max(longest, size)
        return longest

    def finish(self) -> tuple[str, list[ToolCall]]:
        _, calls = parse_tool_calls(self.text, self.fmt)
        if calls:  # the text before the calls went out as it came
            return "", calls
        return self.text[self.sent:], []
