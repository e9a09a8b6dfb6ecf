"""Generate tests/fixtures/chat/templates.json: chat-template reference renderings made by
Hugging Face transformers, for a Rust test that renders the same templates with minijinja and
compares the strings exactly.

Run from anywhere (needs transformers >= 5 with jinja2 >= 3.1.6; CPU only, a few seconds, no
network):

    python scripts/make_chat_fixtures.py [--out PATH] [--check]

`--check` re-renders everything and compares with the file already written instead of writing
it (exit status 1 on any difference). Output was written with transformers 5.24.0, jinja2 3.1.6.

What the file holds: a JSON array, one object per template:

    {"name":        short id, e.g. "qwen2.5",
     "source":      the model the template was published with, e.g. "Qwen/Qwen2.5-7B-Instruct",
     "origin":      where this script read the template text from,
     "template":    the full template text, byte-exact,
     "bos_token":   string, or null when the tokenizer has none (then bos_token is NOT passed
                    to the template at all: transformers leaves None tokens out),
     "eos_token":   string or null (same rule),
     "extra":       the other special-token kwargs passed (unk_token, pad_token, mask_token, ...),
     "strftime_now_date": "2024-07-26T12:00:00" -- the fixed clock `strftime_now` read while
                    rendering (transformers' own strftime_now reads datetime.now(); it is patched),
     "skipped_cases": [{"id", "reason"}] cases transformers failed on unexpectedly (normally []),
     "cases": [
        {"id": "...", "messages": [...], "add_generation_prompt": bool,
         "tools": [...]          (only when the case passes tools; otherwise tools=None is passed),
         "kwargs": {...}         (only when the case passes extra template kwargs),
         "date_dependent": true  (only when the output changes with the strftime_now date),
         "expected": "<rendered string>"}
      or the same with "error": "<message>" and "error_type": "TemplateError" instead of
         "expected" when the template rejects the conversation through raise_exception(...).
     ]}

Every case is rendered exactly as
`tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
add_generation_prompt=..., **kwargs)` renders it: through
`transformers.utils.chat_template_utils.render_jinja_template` with
`{**tokenizer.special_tokens_map, **kwargs}` as extra kwargs, where special_tokens_map is
bos/eos/unk/sep/pad/cls/mask_token (those that are not None). For the two models that have a
local tokenizer folder (SmolLM2-135M-Instruct and gemma-3-270m) the script also loads the real
tokenizer and asserts that `apply_chat_template` gives the same strings (and errors).

Template sources:
- SmolLM2-135M-Instruct: /root/routelm-real/hf/smollm2-135m-instruct/chat_template.jinja,
  special tokens from the tokenizer_config.json next to it.
- Gemma 3 instruct: neither /root/routelm-real/hf/gemma-3-270m/tokenizer_config.json nor the
  gemma-3-270m GGUF has a chat template (it is the pretrained base model), so the template is
  the one transformers' own Gemma 3 converter writes into instruct checkpoints
  (`_CHAT_TEMPLATE` in src/transformers/models/gemma3/convert_gemma3_weights.py,
  huggingface/transformers@0d7e95d96b4e187c651e2b2406ed98ed40d74963), copied below verbatim;
  special tokens from gemma-3-270m's tokenizer_config.json.
- The rest: llama.cpp's copies of the published templates in
  vendor/llama.cpp/models/templates/ of llama_cpp_python 0.3.36 (fetched by llama.cpp's
  scripts/get_chat_template.py from the Hub), with bos/eos as the models' tokenizers define them.
"""

import argparse
import copy
import json
import os
import sys
from datetime import datetime

import jinja2
import transformers
import transformers.utils.chat_template_utils as ctu
from transformers.utils.chat_template_utils import render_jinja_template

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "fixtures", "chat", "templates.json")
# where the published files were unpacked (override with the environment)
HF = os.environ.get("ROUTELM_REAL_HF", "/root/routelm-real/hf")
LLAMACPP_TEMPLATES = os.environ.get(
    "LLAMACPP_TEMPLATES", "/root/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates")

# The clock strftime_now reads while rendering, and a second one used only to find out which
# cases depend on the date.
FIXED_NOW = datetime(2024, 7, 26, 12, 0, 0)
OTHER_NOW = datetime(2031, 3, 9, 8, 30, 0)

# transformers' PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES, in its order
SPECIAL_TOKEN_KEYS = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]

# Verbatim from huggingface/transformers src/transformers/models/gemma3/convert_gemma3_weights.py
# (commit 0d7e95d96b4e187c651e2b2406ed98ed40d74963), the template of Gemma 3 instruct checkpoints.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""


def read(path):
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def special_tokens_from_config(folder):
    cfg = json.load(open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8"))
    out = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = cfg.get(key)
        if isinstance(value, dict):  # AddedToken serialised as a dict
            value = value.get("content")
        if value is not None:
            out[key] = value
    return out


def templates():
    """(name, source, origin, template text, special tokens dict, hf folder or None, features)."""
    out = []
    smol = os.path.join(HF, "smollm2-135m-instruct")
    out.append(dict(name="smollm2", source="HuggingFaceTB/SmolLM2-135M-Instruct",
                    origin=os.path.join(smol, "chat_template.jinja"),
                    template=read(os.path.join(smol, "chat_template.jinja")),
                    tokens=special_tokens_from_config(smol), folder=smol, features=set()))
    gemma = os.path.join(HF, "gemma-3-270m")
    cfg_template = json.load(open(os.path.join(gemma, "tokenizer_config.json"))).get("chat_template")
    out.append(dict(name="gemma3", source="google/gemma-3-270m-it (Gemma 3 instruct template)",
                    origin=(os.path.join(gemma, "tokenizer_config.json") if cfg_template else
                            "transformers src/transformers/models/gemma3/convert_gemma3_weights.py "
                            "_CHAT_TEMPLATE @0d7e95d96b4e187c651e2b2406ed98ed40d74963 (gemma-3-270m base "
                            "tokenizer_config.json and GGUF carry no chat template)"),
                    template=cfg_template or GEMMA3_CHAT_TEMPLATE,
                    tokens=special_tokens_from_config(gemma), folder=gemma, features=set()))

    def lc(name, file, source, tokens, features=()):
        path = os.path.join(LLAMACPP_TEMPLATES, file)
        out.append(dict(name=name, source=source, origin="llama.cpp models/templates/" + file,
                        template=read(path), tokens=tokens, folder=None, features=set(features)))

    lc("llama3.1", "meta-llama-Llama-3.1-8B-Instruct.jinja", "meta-llama/Llama-3.1-8B-Instruct",
       {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, ["tools", "date_string"])
    lc("llama3.2", "meta-llama-Llama-3.2-3B-Instruct.jinja", "meta-llama/Llama-3.2-3B-Instruct",
       {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, ["tools", "date_string"])
    lc("qwen2.5", "Qwen-Qwen2.5-7B-Instruct.jinja", "Qwen/Qwen2.5-7B-Instruct",
       {"eos_token": "<|im_end|>"}, ["tools"])
    lc("qwen3", "Qwen-Qwen3-0.6B.jinja", "Qwen/Qwen3-0.6B",
       {"eos_token": "<|im_end|>"}, ["tools", "qwen3_thinking"])
    lc("phi3.5", "microsoft-Phi-3.5-mini-instruct.jinja", "microsoft/Phi-3.5-mini-instruct",
       {"bos_token": "<s>", "eos_token": "<|endoftext|>"})
    lc("mistral-nemo", "mistralai-Mistral-Nemo-Instruct-2407.jinja", "mistralai/Mistral-Nemo-Instruct-2407",
       {"bos_token": "<s>", "eos_token": "</s>"}, ["tools"])
    lc("gemma2", "google-gemma-2-2b-it.jinja", "google/gemma-2-2b-it",
       {"bos_token": "<bos>", "eos_token": "<eos>"})
    lc("deepseek-v3.1", "deepseek-ai-DeepSeek-V3.1.jinja", "deepseek-ai/DeepSeek-V3.1",
       {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}, ["deepseek_thinking"])
    return out


# ---------------------------------------------------------------- conversations

U1 = {"role": "user", "content": "Hello! What is 2+2?"}
SYS = {"role": "system", "content": "You are a helpful assistant."}
HAIKU = {"role": "user", "content": "Write a haiku about the sea."}
# leading/trailing spaces, newlines, a tab, non-ASCII (Latin, emoji, CJK), quotes and a backslash
MULTI = [
    {"role": "user", "content": "  Bonjour! Je voudrais un café ☕ s'il vous plaît.\nAlso: 日本語 please.  "},
    {"role": "assistant", "content": " Voilà: café ☕ — 日本語 means \"Japanese\".\nC:\\path ok? "},
    {"role": "user", "content": "Thanks!\n\tOne more: what's 3×3? 🙂 "},
]

# Tool schema and call: key order is not sorted (json.dumps keeps insertion order), the
# description has <, >, & and ' (which transformers' tojson leaves unescaped) and non-ASCII.
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city — température in °C. Use <city> & don't guess.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. \"Zürich\" or 東京"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city"],
        },
    },
}
TOOL_CONVERSATION = [
    {"role": "user", "content": "What's the weather in Zürich?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call12345", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius", "days": 1, "lat": 47.37}}}]},
    {"role": "tool", "tool_call_id": "call12345", "content": "{\"temp\": 21.5, \"sky\": \"sunny ☀\"}"},
]


def cases_for(features):
    """(id, messages, add_generation_prompt, tools or None, kwargs dict)."""
    base = [
        ("a_single_user", [U1]),
        ("b_system_user", [SYS, HAIKU]),
        ("c_multi_turn_unicode", MULTI),
        ("c2_system_multi_turn", [SYS] + MULTI),
        ("d_two_users_in_a_row", [{"role": "user", "content": "First question."},
                                  {"role": "user", "content": "Second question?"}]),
        ("e_assistant_first", [{"role": "assistant", "content": "I speak first."},
                               {"role": "user", "content": "Hi"}]),
    ]
    out = []
    for cid, messages in base:
        for agp in (True, False):
            out.append((f"{cid}_{'gen' if agp else 'nogen'}", messages, agp, None, {}))
    if "tools" in features:
        out.append(("t_tools_user_only_gen", [U1], True, [WEATHER_TOOL], {}))
        out.append(("t_tools_call_and_result_gen", TOOL_CONVERSATION, True, [WEATHER_TOOL], {}))
    if "date_string" in features:
        out.append(("k_date_string_kwarg_gen", [SYS, HAIKU], True, None, {"date_string": "01 Jan 2025"}))
    if "qwen3_thinking" in features:
        out.append(("k_enable_thinking_false_gen", [U1], True, None, {"enable_thinking": False}))
        out.append(("k_enable_thinking_true_gen", [U1], True, None, {"enable_thinking": True}))
        out.append(("k_reasoning_in_last_assistant_nogen",
                    [U1, {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n2+2 = 4."}],
                    False, None, {}))
        out.append(("k_reasoning_in_earlier_assistant_gen",
                    [U1, {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n2+2 = 4."},
                     {"role": "user", "content": "And 3+3?"}], True, None, {}))
    if "deepseek_thinking" in features:
        out.append(("k_thinking_true_gen", [SYS, U1], True, None, {"thinking": True}))
        out.append(("k_think_stripped_from_assistant_nogen",
                    [U1, {"role": "assistant", "content": "<think>Add them.</think>2+2 = 4."}], False, None, {}))
    return out


# ---------------------------------------------------------------- rendering


class _Clock(datetime):
    now_value = FIXED_NOW

    @classmethod
    def now(cls, tz=None):
        return cls.now_value


def render(template, tokens, messages, agp, tools, kwargs, now):
    """What apply_chat_template(..., tokenize=False) returns, with strftime_now reading `now`."""
    _Clock.now_value = now
    saved = ctu.datetime
    ctu.datetime = _Clock  # transformers' strftime_now calls datetime.now() through this module global
    try:
        template_kwargs = {**tokens, **kwargs}  # as apply_chat_template: {**special_tokens_map, **kwargs}
        rendered, _ = render_jinja_template(
            conversations=[copy.deepcopy(messages)], tools=copy.deepcopy(tools), documents=None,
            chat_template=template, add_generation_prompt=agp, **template_kwargs)
        return rendered[0]
    finally:
        ctu.datetime = saved


def build():
    result = []
    for t in templates():
        tokens = t["tokens"]
        tokenizer = None
        if t["folder"] is not None:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(t["folder"], local_files_only=True)
            assert tokenizer.special_tokens_map == tokens, (t["name"], tokenizer.special_tokens_map, tokens)
            if tokenizer.chat_template is None:
                tokenizer.chat_template = t["template"]
            assert tokenizer.chat_template == t["template"], t["name"]
        entry = {
            "name": t["name"],
            "source": t["source"],
            "origin": t["origin"],
            "template": t["template"],
            "bos_token": tokens.get("bos_token"),
            "eos_token": tokens.get("eos_token"),
            "extra": {k: v for k, v in tokens.items() if k not in ("bos_token", "eos_token")},
            "strftime_now_date": FIXED_NOW.isoformat(),
            "skipped_cases": [],
            "cases": [],
        }
        for cid, messages, agp, tools, kwargs in cases_for(t["features"]):
            case = {"id": cid, "messages": copy.deepcopy(messages), "add_generation_prompt": agp}
            if tools is not None:
                case["tools"] = copy.deepcopy(tools)
            if kwargs:
                case["kwargs"] = dict(kwargs)
            try:
                out = render(t["template"], tokens, messages, agp, tools, kwargs, FIXED_NOW)
            except Exception as e:  # noqa: BLE001
                if type(e) is jinja2.exceptions.TemplateError:  # what raise_exception(...) raises
                    case["error"] = str(e)
                    case["error_type"] = "TemplateError"
                else:
                    entry["skipped_cases"].append({"id": cid, "reason": f"{type(e).__name__}: {e}"})
                    continue
            else:
                case["expected"] = out
                if render(t["template"], tokens, messages, agp, tools, kwargs, OTHER_NOW) != out:
                    case["date_dependent"] = True
            if tokenizer is not None:  # cross-check against the real tokenizer's apply_chat_template
                _Clock.now_value = FIXED_NOW
                saved, ctu.datetime = ctu.datetime, _Clock
                try:
                    got = tokenizer.apply_chat_template(copy.deepcopy(messages), tools=copy.deepcopy(tools),
                                                        tokenize=False, add_generation_prompt=agp, **kwargs)
                    assert "expected" in case and got == case["expected"], (t["name"], cid, got)
                except jinja2.exceptions.TemplateError as e:
                    assert case.get("error") == str(e), (t["name"], cid, e)
                finally:
                    ctu.datetime = saved
            entry["cases"].append(case)
        result.append(entry)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--check", action="store_true", help="compare with the written file instead of writing")
    args = ap.parse_args()
    data = build()
    text = json.dumps(data, ensure_ascii=False, indent=1) + "\n"
    if args.check:
        old = read(args.out)
        if old != text:
            print(f"{args.out} differs from a fresh rendering", file=sys.stderr)
            sys.exit(1)
        print(f"{args.out} is up to date")
        return
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    n = sum(len(e["cases"]) for e in data)
    errors = sum(1 for e in data for c in e["cases"] if "error" in c)
    skipped = sum(len(e["skipped_cases"]) for e in data)
    print(f"wrote {args.out}: {len(data)} templates, {n} cases ({errors} errors), {skipped} skipped, "
          f"{len(text.encode())} bytes; transformers {transformers.__version__}, jinja2 {jinja2.__version__}")


if __name__ == "__main__":
    main()
