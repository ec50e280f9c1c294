"""Give a HF causal LM with tied embeddings its own lm_head (a copy of the embedding matrix).

    python utils/untie_embeds_hf.py --model_name models/Llama-3.2-1B --save_name models/Llama-3.2-1B-untied

Used before training a non-recurrent baseline, so it has the same untied head as the recurrent
models (conversion unties on its own). Writes to a temp dir and renames; never overwrites without
--overwrite.
"""

import argparse
import sys
from pathlib import Path

from retrofit.atomic import atomic_directory
from retrofit.errors import first_line


def untie(model_name: str, save_name: str, overwrite: bool = False) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save = Path(save_name)
    if save.exists() and not overwrite:
        raise ValueError(f"--save_name {save} already exists (pass --overwrite to replace it)")
    if Path(model_name).exists() and not (Path(model_name) / "config.json").exists():
        raise ValueError(f"--model_name {model_name} has no config.json: not a HF model directory")
    model = AutoModelForCausalLM.from_pretrained(model_name, dtype="auto")
    if not model.config.tie_word_embeddings:
        print(f"note: {model_name} already has an untied lm_head; saving an unchanged copy")
    embedding = model.get_input_embeddings().weight
    head = torch.nn.Linear(embedding.shape[1], embedding.shape[0], bias=False, dtype=embedding.dtype)
    with torch.no_grad():
        head.weight.copy_(embedding)
    model.config.tie_word_embeddings = False
    model.set_output_embeddings(head)
    with atomic_directory(save) as tmp:
        model.save_pretrained(tmp)
        try:
            AutoTokenizer.from_pretrained(model_name).save_pretrained(tmp)
        except (OSError, ValueError):
            print(f"warning: no tokenizer found in {model_name}; saved the model without one")
    return save


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name", required=True, help="local HF model dir or Hub id")
    parser.add_argument("--save_name", required=True, help="output directory")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        path = untie(args.model_name, args.save_name, args.overwrite)
    except (ValueError, OSError) as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        return 2
    print(f"saved untied model to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
