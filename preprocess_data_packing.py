"""Tokenize a `save_to_disk` dataset and pack it into rows of exactly max_length + 1 tokens.

Plain text (q_col="text"): every document is stripped, tokenized (BOS if the tokenizer adds one)
and ends with EOS. Chat (q_col != "text", e.g. --q_col=question --a_col=answer): each row becomes a
(system, user, assistant) conversation in the tokenizer's chat template, with a `loss_mask` column
that is 1 on the answer tokens only (or on every token with --take_loss_over_all_tokens=true).

Packing: --wrapped_packing=true (default) concatenates everything and cuts it into rows (nothing
lost or repeated); --wrapped_packing=false --pack=true packs whole documents best-fit into rows;
--pack=false --wrapped_packing=false gives one padded/truncated document per row.

Output (as in the original): save_to_disk at
    {save_path}/llama_huginn_preprocessed_data{_packed_wrapped|_packed|}/{tokenizer_name}/{out_path}/dataset
with columns input_ids (list<int32>), attention_mask (list<int8>) [, loss_mask (list<int8>)].

    python preprocess_data_packing.py --tokenizer_name=meta-llama/Llama-3.2-1B \
        --dataset_location=data/datasets/Nemotron-CC-Math-v1-4plus --out_path=llama_nemotron_math \
        --save_path=data --num_proc=32
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # parallelism comes from --num_proc

from retrofit.data.preprocess import process_data  # noqa: E402
from retrofit.data.rows import DataError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import CLI

    try:
        CLI(process_data, args=argv)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
