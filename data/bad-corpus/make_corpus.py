#!/usr/bin/env python3
"""Writes corpus.jsonl, expected.jsonl and images/ of the bad-input corpus (run from this dir)."""
import base64
import json
import struct
import zlib


def png():
    """A valid 1x1 RGB PNG."""
    def chunk(t, d):
        return struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xffffffff)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 1, 1, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(b'\x00\xff\x00\x00')) + chunk(b'IEND', b''))


open('images/ok.png', 'wb').write(png())
open('images/not-an-image.png', 'w').write("this is text, not a PNG\n")
ok_uri = "data:image/png;base64," + base64.b64encode(png()).decode()
u = lambda t: {"role": "user", "content": t}
a = lambda t: {"role": "assistant", "content": t}
L = lambda d: json.dumps(d, ensure_ascii=False).encode()
img = lambda part: {"messages": [{"role": "user", "content": [part]}, a("x")]}
lines = [  # (bytes, expected kind or None, reason fragment)
    (L({"id": "good-1", "messages": [u("Hi"), a("Hello!")]}), None, None),
    (b'{"messages": [{"role": "user", "content": "unterminated', "invalid_json", "invalid JSON"),
    (b'[1, 2, 3]', "not_an_object", "expected a JSON object"),
    (L({"prompt": "hi", "answer": "yo"}), "no_conversation", "keys: prompt, answer"),
    (L({"messages": []}), "empty_conversation", "empty"),
    (L({"messages": [u("Hi"), {"role": "wizard", "content": "Abracadabra"}]}), "unknown_role", "unknown role `wizard`"),
    (L({"messages": [u(42), a("x")]}), "bad_message", "saw 42"),
    (L({"messages": [{"content": "no role"}, a("x")]}), "bad_message", "no string `role`"),
    (L(img({"type": "audio", "audio": "a.wav"})), "unknown_part", "unknown type `audio`"),
    (L({"messages": [{"role": "user", "content": [{"type": "image", "image": "images/nope.png"}, {"type": "text", "text": "What is this?"}]}, a("x")]}), "missing_image", "images/nope.png"),
    (L(img({"type": "image_url", "image_url": {"url": "images/not-an-image.png"}})), "bad_image", "not-an-image.png"),
    (L(img({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K%%%"}})), "bad_image", "invalid base64"),
    (L(img({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}})), "bad_image", "nothing is downloaded"),
    (L({"messages": [{"role": "user", "content": [{"type": "image", "path": "images/ok.png"}, {"type": "text", "text": "Describe."}]}, a("A green pixel.")]}), "images_unsupported", "text-only"),
    (L({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ok_uri}}]}, a("A green pixel.")]}), "images_unsupported", "text-only"),
    (L({"id": "good-1", "messages": [u("Again"), a("Again!")]}), "duplicate_id", "`good-1`"),
    (L({"messages": [u("word " * 200), a("Short.")]}), "over_long", "above --max-len 64"),
    (L({"messages": [u("Is anyone there?")]}), "no_assistant", "no assistant turn"),
    (b'{"messages": [{"role": "user", "content": "bad \xff\xfe bytes"}]}', "invalid_utf8", "not UTF-8"),
    (b'   ', None, "blank"),
    (L({"id": "good-2", "conversations": [{"from": "human", "value": "Hey"}, {"from": "gpt", "value": "Hi there."}]}), None, None),
    (L({"messages": [u("Hi"), {"role": "assistant", "content": {"text": "an object"}}]}), "bad_message", "no string or list"),
]
with open('corpus.jsonl', 'wb') as f:
    for b, _, _ in lines:
        f.write(b + b'\n')
with open('expected.jsonl', 'w') as f:
    for n, (_, k, r) in enumerate(lines, 1):
        if k:
            f.write(json.dumps({"line": n, "kind": k, "reason_contains": r}) + "\n")
