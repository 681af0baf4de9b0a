"""Anthropic Messages and OpenAI Responses bodies -> the chat-completions body vLLM renders them as.

vLLM 0.32 serves both by converting them to chat messages and applying the model's chat template
(vllm/entrypoints/anthropic/serving.py `to_chat_completion_request`; vllm/entrypoints/openai/responses/utils.py
`construct_input_messages`, `construct_tool_dicts`). The router does the same conversion here, then tokenizes the
result with the chat path (tokens.PromptTokenizer.chat_tokens), so its block keys are the engine's. Only what
reaches the prompt is converted (messages, system/instructions, tools, template switches); sampling fields are
the backend's business. Images are passed on as image parts, which the chat path leaves out of the text (the
router does not key multimodal prompts exactly, as for chat).

A body that cannot be converted raises tokens.PromptError (a 400, as vLLM's validation gives).
"""

from __future__ import annotations

import json
from typing import Any

from preble_router.tokens import PromptError

# Claude Code prepends a per-request hash to its system prompt; vLLM drops it so the prefix stays cacheable.
_BILLING_HEADER = "x-anthropic-billing-header"
_TEXT_PARTS = ("text", "input_text", "output_text")  # Responses content parts vLLM's chat parser reads as text


def _blocks(value: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(b, dict) for b in value):
        raise PromptError(f"'{what}' must be a string or a list of content blocks")
    return value


def _system_text(content: Any, what: str) -> str | None:
    """A system prompt's text, billing headers left out (vLLM's _extract_system_text)."""
    if isinstance(content, str):
        return None if content.startswith(_BILLING_HEADER) else content
    parts = [b["text"] for b in _blocks(content, what) if b.get("type") == "text" and isinstance(b.get("text"), str)
             and b["text"] and not b["text"].startswith(_BILLING_HEADER)]
    return "".join(parts) if parts else None


def _image_url(source: dict[str, Any]) -> str:
    if source.get("type") == "url":
        return str(source.get("url", ""))
    return f"data:{source.get('media_type', 'image/jpeg')};base64,{source.get('data', '')}"


def _tool_dict(name: Any, description: Any, parameters: Any, strict: Any, defer_loading: Any) -> dict[str, Any]:
    """A tool as vLLM hands it to the chat template: ChatCompletionToolsParam.model_dump() (unset flags left out)."""
    if not isinstance(name, str):
        raise PromptError("every tool needs a string 'name'")
    function: dict[str, Any] = {"name": name, "description": description, "parameters": parameters}
    if strict is not None:
        function["strict"] = strict
    if defer_loading is not None:
        function["defer_loading"] = defer_loading
    return {"type": "function", "function": function}


def _chat_body(body: dict[str, Any], messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
               max_tokens: Any, **template: Any) -> dict[str, Any]:
    """The fields Router.prepare reads (model, cache_salt, max_tokens) and those chat_tokens renders."""
    if not messages:
        raise PromptError("the request has no message to render")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise PromptError("'chat_template_kwargs' must be an object")
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages, "max_tokens": max_tokens,
                           "chat_template_kwargs": kwargs, **template}
    if isinstance(body.get("cache_salt"), str):
        out["cache_salt"] = body["cache_salt"]
    if tools:
        out["tools"] = tools
    return out


# ---- Anthropic Messages ------------------------------------------------------------------------------------
def requires_system_first(tokenizer: Any) -> bool:
    """Whether vLLM merges a Messages request's inline system messages into the leading one for this model: its
    chat template fails on [system, user, system, user], rendered as vLLM's _detect_merge_inline_system renders it
    (a bare sandbox: no raise_exception, no bos_token), for the template with and without tools."""
    import jinja2.ext
    import jinja2.sandbox

    templates = tokenizer.chat_template
    if isinstance(templates, dict):
        templates = [templates.get("default"), templates.get("tool_use", templates.get("default"))]
    elif not isinstance(templates, list):
        templates = [templates]
    probe = [{"role": r, "content": "t"} for r in ("system", "user", "system", "user")]
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    for template in templates:
        if not isinstance(template, str) or not template:
            return True
        try:
            env.from_string(template).render(messages=probe, add_generation_prompt=False)
        except jinja2.TemplateError:
            return True
    return False


def messages_to_chat(body: dict[str, Any], *, merge_inline_system: bool) -> dict[str, Any]:
    """POST /v1/messages -> the chat body vLLM's AnthropicServingMessages renders. merge_inline_system: the
    template refuses a system message after the first turn, so vLLM moves them all into the leading one."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise PromptError("'messages' must be a non-empty list of message objects")
    out: list[dict[str, Any]] = []
    system = body.get("system")
    system_parts = []
    if system is not None and system != "" and (text := _system_text(system, "system")) is not None:
        system_parts.append(text)
    if merge_inline_system:
        system_parts += [t for m in messages if m.get("role") == "system"
                         and (t := _system_text(m.get("content"), "content")) is not None]
    if system_parts:
        out.append({"role": "system", "content": "".join(system_parts)})
    for message in messages:
        _convert_anthropic_message(message, out, merge_inline_system)
    return _chat_body(body, out, _anthropic_tools(body), body.get("max_tokens"))


def _convert_anthropic_message(message: dict[str, Any], out: list[dict[str, Any]], merge_inline_system: bool) -> None:
    role, content = message.get("role"), message.get("content")
    if role == "system":
        if not merge_inline_system and (text := _system_text(content, "content")):
            out.append({"role": "system", "content": text})
        return
    converted: dict[str, Any] = {"role": role}
    if isinstance(content, str):
        converted["content"] = content
    else:
        parts: list[dict[str, Any]] = []
        tool_calls: list[dict[str, Any]] = []
        reasoning: list[str] = []
        for block in _blocks(content, "content"):
            _convert_anthropic_block(block, role, parts, tool_calls, reasoning, out)
        if reasoning:
            converted["reasoning"] = "".join(reasoning)
        if tool_calls:
            converted["tool_calls"] = tool_calls
        if parts:
            one_text = len(parts) == 1 and parts[0]["type"] == "text"
            converted["content"] = parts[0]["text"] if one_text else parts
    if not (role == "user" and "content" not in converted):
        out.append(converted)


def _convert_anthropic_block(block: dict[str, Any], role: Any, parts: list[dict[str, Any]],
                             tool_calls: list[dict[str, Any]], reasoning: list[str],
                             out: list[dict[str, Any]]) -> None:
    kind = block.get("type")
    if kind == "text" and block.get("text"):
        parts.append({"type": "text", "text": block["text"]})
    elif kind == "image" and isinstance(block.get("source"), dict):
        parts.append({"type": "image_url", "image_url": {"url": _image_url(block["source"])}})
    elif kind == "thinking" and isinstance(block.get("thinking"), str):
        reasoning.append(block["thinking"])
    elif kind == "tool_use":
        tool_calls.append({"id": block.get("id") or "call_0", "type": "function",
                           "function": {"name": block.get("name") or "",
                                        "arguments": json.dumps(block.get("input") or {})}})
    elif kind == "tool_result":
        result = block.get("content")
        if role != "user":
            parts.append({"type": "text", "text": f"Tool result: {result if result else ''}"})
            return
        items = result if isinstance(result, list) else []
        texts = [i.get("text", "") for i in items if isinstance(i, dict) and i.get("type") == "text"]
        images = [_image_url(i.get("source") or {}) for i in items if isinstance(i, dict) and i.get("type") == "image"]
        refs = [{"type": "tool_reference", "name": n} for i in items if isinstance(i, dict)
                and i.get("type") == "tool_reference" and (n := i.get("tool_name") or i.get("name"))]
        call_id = block.get("tool_use_id") or ""
        out.append({"role": "tool", "tool_call_id": call_id,
                    "content": (result if isinstance(result, str) else "\n".join(texts)) or ""})
        if images:
            out.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in images]})
        if refs:
            out.append({"role": "tool", "tool_call_id": call_id, "content": refs})


def _anthropic_tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise PromptError("'tools' must be a list of tool objects")
    return [_tool_dict(t.get("name"), t.get("description"), t.get("input_schema"), t.get("strict"),
                       t.get("defer_loading")) for t in tools]


# ---- OpenAI Responses --------------------------------------------------------------------------------------
def responses_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """POST /v1/responses (without previous_response_id: that history is the backend's) -> the chat body vLLM's
    non-Harmony Responses renderer builds: instructions as the system message, then the input items."""
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise PromptError("'instructions' must be a string")
    if instructions:
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list) and all(isinstance(i, dict) for i in items):
        for item in items:
            message = _response_item_message(item, messages[-1] if messages else None)
            if message is not None:
                messages.append(message)
    else:
        raise PromptError("'input' must be a string or a list of input items")
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    continue_final = _continues_final_message(items)
    # vLLM tokenizes the rendered Responses prompt with add_special_tokens (TokenizeParams' default, unlike chat):
    # a template that writes its own BOS gets a second one.
    template = {"add_generation_prompt": not continue_final, "continue_final_message": continue_final,
                "add_special_tokens": True}
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None or isinstance(kwargs, dict):  # vLLM adds these to the template's kwargs
        extra: dict[str, Any] = {"reasoning_effort": effort}
        if effort is not None and "enable_thinking" not in (kwargs or {}):
            extra["enable_thinking"] = effort != "none"
        body = {**body, "chat_template_kwargs": {**(kwargs or {}), **extra}}
    return _chat_body(body, messages, _responses_tools(body), body.get("max_output_tokens"), **template)


def _continues_final_message(items: Any) -> bool:
    """vLLM's should_continue_final_message: a last assistant message left in progress is continued."""
    if not isinstance(items, list) or not items:
        return False
    last = items[-1]
    return last.get("type", "message") in ("message", "reasoning") and last.get("status") in ("in_progress",
                                                                                              "incomplete")


def _response_item_message(item: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any] | None:
    """One input item as a chat message; None when it was merged into `previous` (an assistant turn spans its
    reasoning, text and tool calls)."""
    assistant = previous if previous is not None and previous.get("role") == "assistant" else None
    kind = item.get("type")
    if kind in ("function_call", "custom_tool_call"):
        name = item.get("name")
        if kind == "function_call":
            if item.get("namespace"):
                name = f"{item['namespace']}.{name}"  # vLLM's flat_namespace_tool_name
            arguments = item.get("arguments")
        else:
            arguments = json.dumps({"input": item.get("input") or ""}, ensure_ascii=False)
        call = {"id": item.get("call_id"), "function": {"name": name, "arguments": arguments}, "type": "function"}
        if assistant is not None and isinstance(assistant.get("tool_calls", []), list):
            assistant.setdefault("tool_calls", []).append(call)
            return None
        return {"role": "assistant", "tool_calls": [call]}
    if kind == "reasoning":
        if item.get("encrypted_content"):
            raise PromptError("Encrypted content is not supported.")
        texts = item.get("content") or item.get("summary") or []
        text = texts[0].get("text", "") if isinstance(texts, list) and texts and isinstance(texts[0], dict) else ""
        if assistant is not None and assistant.get("reasoning") is None:
            assistant["reasoning"] = text
            return None
        return {"role": "assistant", "reasoning": text}
    if kind in ("function_call_output", "custom_tool_call_output"):
        return {"role": "tool", "content": item.get("output"), "tool_call_id": item.get("call_id")}
    role = item.get("role")
    if role == "assistant":
        content = item.get("content")
        text = content if isinstance(content, str) else (
            content[0].get("text") if isinstance(content, list) and content and isinstance(content[0], dict)
            else None)
        if text is not None:
            if assistant is not None and assistant.get("content") is None:
                assistant["content"] = text
                return None
            return {"role": "assistant", "content": text}
    if role is not None:
        content = item.get("content")
        if isinstance(content, list):  # input_text / output_text parts are text to vLLM's chat parser
            content = [{**p, "type": "text"} if isinstance(p, dict) and p.get("type") in _TEXT_PARTS else p
                       for p in content]
        return {k: v for k, v in {**item, "content": content}.items() if k not in ("type", "status", "id")}
    raise PromptError(f"Unsupported input item type: {kind}")


def _responses_tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if not tools:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise PromptError("'tools' must be a list of tool objects")
    return [_tool_dict(t.get("name"), t.get("description"), t.get("parameters"), t.get("strict"),
                       t.get("defer_loading")) for t in tools if t.get("type") == "function"]
