"""Small deterministic corpora and tokenizers, for the offline quickstart and the tests.

Nothing here downloads anything: the corpus is GSM8K-style arithmetic word problems with
step-by-step answers ending in "#### N", and the tokenizer is a byte-level BPE trained on it in
about a second with the `tokenizers` package.
"""

from __future__ import annotations

import random
from pathlib import Path

NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jill", "Kai", "Lena"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cookies", "shells"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]


def arithmetic_problem(rng: random.Random) -> dict:
    """One word problem with a two-step worked answer in GSM8K format."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(1, 9)
    kind = rng.randrange(3)
    if kind == 0:
        question = f"{name} has {a} {item}. {name} buys {b} more and then gives away {c}. How many {item} does {name} have now?"
        mid, final = a + b, a + b - c
        answer = f"{name} starts with {a} and buys {b}, so {a} + {b} = {mid}. Then {name} gives away {c}, so {mid} - {c} = {final}.\n#### {final}"
    elif kind == 1:
        question = f"{name} packs {a} boxes with {c} {item} each and finds {b} extra {item}. How many {item} are there in total?"
        mid, final = a * c, a * c + b
        answer = f"{a} boxes of {c} make {a} * {c} = {mid}. Adding {b} extra gives {mid} + {b} = {final}.\n#### {final}"
    else:
        question = f"{name} had {a + b} {item} and lost {b}. Then {name} doubled what was left. How many {item} now?"
        mid, final = a, 2 * a
        answer = f"After losing {b}, {name} has {a + b} - {b} = {mid}. Doubling gives 2 * {mid} = {final}.\n#### {final}"
    return {"question": question, "answer": answer, "target": str(final)}


def arithmetic_problems(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [arithmetic_problem(rng) for _ in range(n)]


def problem_text(problem: dict) -> str:
    """A problem as plain pretraining text, in the Q:/A: format of gsm8k-cot prompts."""
    return f"Q: {problem['question']}\nA: Let's think step by step. {problem['answer']}"


def train_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer, save it as a HF fast tokenizer in out_dir and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    # Like Llama tokenizers: BOS is added in front of every encoded text.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    return hf_tok
