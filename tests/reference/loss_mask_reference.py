#!/usr/bin/env python3
"""Independent loss masks for a chat dataset, built with transformers on the target's tokenizer.

Two constructions, which must agree with each other (asserted here) before the Rust side is
compared with them:
  (a) transformers' own assistant-token mask: `apply_chat_template(..., return_assistant_tokens_mask=True)`
      with a copy of the SmolLM2 template whose assistant turns are wrapped in
      {% generation %}...{% endgeneration %} (content + <|im_end|>; the header and the newline after
      <|im_end|> are outside). The tagged template must render exactly what the original renders.
  (b) per-turn rendering: for each assistant message j, render conv[:j] with add_generation_prompt
      and conv[:j+1] without; the assistant span runs from the end of the first to the last
      <|im_end|> of the second; a token is masked in when its character span overlaps it.

Input lines: {"id", "messages" | "conversations"} (OpenAI or ShareGPT form; text-part lists are
joined with "\n", as text-only chat servers do). Output OUT/masks.json: {id: {"input_ids", "loss_mask"}}.
Run: python loss_mask_reference.py OUT MODEL_DIR DATA.jsonl [content-hash]
"""
import json
import pathlib
import sys

from transformers import AutoTokenizer

ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
        "system": "system", "tool": "tool"}

TAGGED = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def normalise(line):
    conv = line.get("messages") or line.get("conversations")
    out = []
    if isinstance(line.get("system"), str):
        out.append({"role": "system", "content": line["system"]})
    for m in conv:
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if isinstance(content, list):
            content = "\n".join(p["text"] for p in content if p.get("type") == "text")
        out.append({"role": ROLE[role], "content": content})
    return out


def per_turn(tok, msgs):
    full = tok.apply_chat_template(msgs, tokenize=False)
    spans = []
    for j, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        p = tok.apply_chat_template(msgs[:j], tokenize=False, add_generation_prompt=True) if j else ""
        s = tok.apply_chat_template(msgs[: j + 1], tokenize=False)
        assert s.startswith(p) and full.startswith(s), "SmolLM2's template is prefix-stable"
        end = s.rfind("<|im_end|>") + len("<|im_end|>")
        spans.append((len(p), end))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a < e and b > s for s, e in spans) and b > a) for a, b in enc["offset_mapping"]]
    return enc["input_ids"], mask


def tagged(tok, msgs):
    out = tok.apply_chat_template(msgs, chat_template=TAGGED, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    plain = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.apply_chat_template(msgs, chat_template=TAGGED, tokenize=False) == plain
    return list(out["input_ids"]), list(out["assistant_masks"])


def main(out, model_dir, data):
    tok = AutoTokenizer.from_pretrained(model_dir)
    result = {}
    for n, text in enumerate(pathlib.Path(data).read_text().splitlines(), 1):
        if not text.strip():
            continue
        line = json.loads(text)
        msgs = normalise(line)
        ids_a, mask_a = tagged(tok, msgs)
        ids_b, mask_b = per_turn(tok, msgs)
        assert ids_a == ids_b, f"line {n}: token ids differ between the two constructions"
        assert mask_a == mask_b, f"line {n}: masks differ:\n{mask_a}\n{mask_b}"
        result[str(line.get("id", f"line-{n}"))] = {"input_ids": ids_a, "loss_mask": mask_a}
    pathlib.Path(out, "masks.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
