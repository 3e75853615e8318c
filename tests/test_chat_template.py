"""Acceptance (issue 3, point 1): chat templates render to the same tokens as transformers'
`apply_chat_template`, for SmolLM2's template and for tiny checkpoints with real ChatML and
Llama-3 templates, with and without a system message, with and without the generation prompt."""

import json

import pytest
from conftest import make_tiny_model, save_tiny

import minillm
from minillm.errors import MinillmError
from minillm.loading.gguf_import import open_gguf
from minillm.tokenizer import load_tokenizer

# Qwen2-Instruct's ChatML template (with its default system message).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's template.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Mistral-style: rejects conversations whose roles do not alternate.
ALTERNATING = (
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{{ message['content'] }}{% endfor %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Colour of the sky?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "  Hello! How can I help?  "}, {"role": "user", "content": "Tell me a joke.\n"}],
    [{"role": "user", "content": "Unicode: café, 東京, emoji 🙂, code `x = {1: 2}`"}],
]


@pytest.fixture(scope="module")
def smollm2_tokenizers(smollm2_gguf):
    from transformers import AutoTokenizer

    ours = load_tokenizer(smollm2_gguf, open_gguf(smollm2_gguf))
    ref = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return ours, ref


def _ref_ids(ref, messages, add_generation_prompt):
    out = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_smollm2_template_matches_transformers(smollm2_tokenizers, conv, add_generation_prompt):
    ours, ref = smollm2_tokenizers
    messages = CONVERSATIONS[conv]
    assert ours.encode_chat(messages, add_generation_prompt) == _ref_ids(ref, messages, add_generation_prompt)


def make_checkpoint_with_template(tmp_path, smollm2_gguf, template, specials):
    """A tiny llama checkpoint whose tokenizer is SmolLM2's plus the template's special tokens."""
    from tokenizers import AddedToken

    d = save_tiny(make_tiny_model("llama"), tmp_path / "ckpt")
    tok = load_tokenizer(smollm2_gguf, open_gguf(smollm2_gguf)).tokenizer
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, **specials}))
    return d


TINY_TEMPLATES = {
    "chatml": (CHATML, {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}),
    "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                        "pad_token": "<|start_header_id|>"}),
}


@pytest.mark.parametrize("name", sorted(TINY_TEMPLATES))
def test_tiny_checkpoint_templates_match_transformers(name, tmp_path, smollm2_gguf):
    from transformers import AutoTokenizer

    template, specials = TINY_TEMPLATES[name]
    d = make_checkpoint_with_template(tmp_path, smollm2_gguf, template, specials)
    ours = minillm.load(d, progress=False).tokenizer
    ref = AutoTokenizer.from_pretrained(d)
    assert ref.convert_tokens_to_ids(specials["eos_token"]) in ours.eos_ids
    for messages in CONVERSATIONS:
        for agp in (True, False):
            assert ours.render_chat(messages, agp) == ref.apply_chat_template(messages, add_generation_prompt=agp,
                                                                             tokenize=False)
            assert ours.encode_chat(messages, agp) == _ref_ids(ref, messages, agp)


def test_template_raise_exception_is_a_clear_error(smollm2_tokenizers):
    ours, _ = smollm2_tokenizers
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(MinillmError, match="roles must alternate"):
        ours.render_chat(bad, template=ALTERNATING)


def test_model_without_template_is_a_clear_error(tmp_path, smollm2_gguf):
    d = make_checkpoint_with_template(tmp_path, smollm2_gguf, None, {"eos_token": "<|im_end|>"})
    tok = minillm.load(d, progress=False).tokenizer
    with pytest.raises(MinillmError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])
