"""Build a tiny random-weight Llama for the real vLLM tier, offline, in seconds.

Run with the vLLM virtualenv's Python: ``python build_tiny_model.py OUT_DIR``.
A byte-level BPE (vocabulary 2048) is trained on Python's own standard library
sources, a chat template is set, and weights are drawn with a fixed seed. The
shapes suit vLLM's CPU attention backend (head size 32).

``--template llama3`` builds a held-out variant instead (for the simulator's
fidelity benchmark): a Llama-3-like template and special tokens
(``<|begin_of_text|>``, ``<|start_header_id|>``, ``<|end_header_id|>``,
``<|eot_id|>``), and a post-processor that prepends ``<|begin_of_text|>`` when
special tokens are added (completions), as Llama 3's tokenizer does. The
default build is unchanged.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% endif %}"
)
#: template name -> (chat template, special tokens, bos, eos, unk, bos added to completions)
VARIANTS = {
    "chatml": (CHAT_TEMPLATE, ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"], False),
    "llama3": (
        LLAMA3_TEMPLATE,
        [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<unk>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        True,
    ),
}


def corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))[:200]
    return [f.read_text(encoding="utf-8", errors="ignore") for f in files]


def main(out: Path, template: str = "chatml") -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    chat_template, special, add_bos = VARIANTS[template]
    bos, eos, unk = special[0], special[1], special[2]
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 0)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
    )
    fast.chat_template = chat_template
    fast.save_pretrained(out)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    (out / "kvroute-tiny.json").write_text(json.dumps({"vocab": tok.get_vocab_size()}))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--template", choices=sorted(VARIANTS), default="chatml")
    cli = parser.parse_args()
    main(cli.out, cli.template)
