#!/usr/bin/env python3
"""transformers' view of the embedded SmolLM2-135M-Instruct: chat-template renderings and greedy
generations, for tests/smollm2.rs.

Usage: smollm2_reference.py OUT MODEL_DIR
Writes OUT/reference.json:
  {"templates": [{"messages": [...], "add_generation_prompt": bool, "text": str, "ids": [int]}],
   "generations": [{"messages": [...], "prompt_ids": [int], "new_ids": [int]}]}
"""
import json
import pathlib
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello there!"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about cats."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "  spaces  and\nnewlines\t "}, {"role": "assistant", "content": "ok\n"}],
    [{"role": "user", "content": "Unicode: café, naïve, 日本語, emoji 🙂"}],
]

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain recursion to a beginner programmer.",
    "List four renewable sources of energy.",
]


def main(out, model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    templates = []
    for conv in CONVERSATIONS:
        for agp in (False, True):
            text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=agp)
            ids = tok(text, add_special_tokens=False).input_ids
            templates.append({"messages": conv, "add_generation_prompt": agp, "text": text, "ids": ids})
    generations = []
    for p in PROMPTS:
        conv = [{"role": "user", "content": p}]
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out_ids = model.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=[2],
                                     pad_token_id=2)
        generations.append({"messages": conv, "prompt_ids": ids[0].tolist(),
                            "new_ids": out_ids[0, ids.shape[1]:].tolist()})
    pathlib.Path(out, "reference.json").write_text(json.dumps({"templates": templates, "generations": generations}, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
