"""Tokenize + pack: wrapped packing is lossless, best-fit keeps documents whole, chat loss masks
cover exactly the answer, workers do not change the result, and bad input fails clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from retrofit.data.packing import (
    Docs,
    PackConfig,
    Rows,
    WrappedPacker,
    best_fit_bins,
    iter_packed_rows,
    pack_best_fit,
    pack_wrapped,
    pad_or_truncate,
    special_token_ids,
    tokenize_chats,
    tokenize_texts,
)
from retrofit.data.rows import DataError, inputs_and_labels
from retrofit.data.synthetic import arithmetic_problems

ROOT = Path(__file__).resolve().parents[1]

SEQ_LEN = 65  # max_length 64


@pytest.fixture(scope="module")
def docs(tokenizer, corpus) -> Docs:
    return tokenize_texts(tokenizer, corpus, tokenizer.eos_token_id)


def test_documents_are_bos_text_eos(tokenizer, corpus, docs):
    """The stream is exactly tokenizer(text) (BOS added by the tokenizer) + EOS, per document."""
    expected = [tokenizer(t.strip())["input_ids"] + [tokenizer.eos_token_id] for t in corpus]
    assert len(docs) == len(corpus)
    assert docs.tokens.tolist() == [tok for doc in expected for tok in doc]
    assert docs.lengths.tolist() == [len(doc) for doc in expected]
    assert expected[0][0] == tokenizer.bos_token_id


def test_wrapped_packing_is_lossless(docs):
    rows = pack_wrapped(docs, SEQ_LEN, pad_id=2)
    assert rows.input_ids.shape == (-(-len(docs.tokens) // SEQ_LEN), SEQ_LEN)
    # Real tokens, row by row, are the tokenized stream: nothing lost, repeated or reordered.
    np.testing.assert_array_equal(rows.real_tokens(), docs.tokens)
    # Only the last row is padded, and padding is a suffix marked 0 in the attention mask.
    assert rows.attention_mask[:-1].all()
    last = rows.attention_mask[-1]
    n_real = len(docs.tokens) - (len(rows) - 1) * SEQ_LEN
    assert last[:n_real].all() and not last[n_real:].any()
    assert (rows.input_ids[-1, n_real:] == 2).all()


def test_wrapped_packer_streaming_equals_one_shot(docs):
    """Feeding the documents in uneven batches gives the same rows as one batch."""
    packer = WrappedPacker(SEQ_LEN, pad_id=2)
    parts, cuts = [], [0, 1, 7, 8, 150, 151, 399, len(docs)]
    for a, b in zip(cuts[:-1], cuts[1:]):
        lo, hi = docs.offsets[a], docs.offsets[b]
        parts.append(packer.add(Docs(docs.tokens[lo:hi], docs.offsets[a : b + 1] - lo)))
    parts.append(packer.finish())
    streamed, one_shot = Rows.concat(parts), pack_wrapped(docs, SEQ_LEN, pad_id=2)
    np.testing.assert_array_equal(streamed.input_ids, one_shot.input_ids)
    np.testing.assert_array_equal(streamed.attention_mask, one_shot.attention_mask)


def test_labels_of_packed_rows_score_every_real_target(docs):
    """inputs_and_labels scores a target only when it and the token before it are real; rows from
    every packing mode pad only after their real tokens, so that is "every target that is not
    padding", the rule training used before it was shared with evaluation: same labels, bit for bit."""
    import torch

    seq_len = int(docs.lengths.max()) + 7  # every document fits: padded rows in every mode
    packed = [pack_wrapped(docs, seq_len, 2), pack_best_fit(docs, seq_len, 2)[0], pad_or_truncate(docs, seq_len, 2)[0]]
    assert all((rows.attention_mask == 0).any() for rows in packed)
    for rows in packed:
        ids, mask = torch.from_numpy(rows.input_ids).long(), torch.from_numpy(rows.attention_mask).long()
        target_is_real = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        inputs, inputs_mask, labels = inputs_and_labels(ids, mask)
        assert torch.equal(labels, target_is_real)
        assert torch.equal(inputs, ids[:, :-1]) and torch.equal(inputs_mask, mask[:, :-1])
    # Padding before real tokens (left padding): the first real token is not predicted from a pad.
    ids, mask = torch.tensor([[2, 2, 5, 6, 7]]), torch.tensor([[0, 0, 1, 1, 1]])
    assert inputs_and_labels(ids, mask)[2].tolist() == [[-100, -100, 6, 7]]


def unique_token_docs(lengths) -> Docs:
    """Documents whose tokens are all distinct (doc i = a run of fresh ids), so each can be found."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Docs(np.arange(10, 10 + offsets[-1], dtype=np.int32), offsets)


def test_best_fit_never_splits_a_document_that_fits():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(1, SEQ_LEN + 1, 500), [SEQ_LEN, 2 * SEQ_LEN + 7, 3 * SEQ_LEN]])
    docs = unique_token_docs(lengths)
    rows, n_split = pack_best_fit(docs, SEQ_LEN, pad_id=0)
    assert n_split == 2 and rows.input_ids.shape[1] == SEQ_LEN
    real = rows.real_tokens()
    assert sorted(real.tolist()) == docs.tokens.tolist()  # every token once
    row_of = np.empty(docs.tokens.max() + 1, dtype=np.int64)
    pos_of = np.empty_like(row_of)
    r, c = np.nonzero(rows.attention_mask)
    row_of[rows.input_ids[r, c]], pos_of[rows.input_ids[r, c]] = r, c
    for i, n in enumerate(lengths):
        tokens = docs.tokens[docs.offsets[i] : docs.offsets[i + 1]]
        if n <= SEQ_LEN:  # whole document, contiguous, in one row
            assert len(set(row_of[tokens])) == 1
            assert (np.diff(pos_of[tokens]) == 1).all()
        else:  # whole rows of its own, then a remainder kept together
            k = n // SEQ_LEN
            for j in range(k):
                chunk = tokens[j * SEQ_LEN : (j + 1) * SEQ_LEN]
                assert len(set(row_of[chunk])) == 1 and rows.attention_mask[row_of[chunk[0]]].all()
            assert len(set(row_of[tokens[k * SEQ_LEN :]])) == (1 if n % SEQ_LEN else 0)
    # Best-fit quality: any two bin rows hold more than a row's worth (else they would have merged).
    fills = np.sort(rows.attention_mask.sum(1))
    assert fills[0] + fills[1] > SEQ_LEN


def test_best_fit_bins_matches_a_plain_reference():
    """The bitset best-fit equals a straightforward list-scan best-fit decreasing."""
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 41, 300)
    bin_of, offset, n_bins = best_fit_bins(sizes, 40)
    free, ref_bin = [], {}
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        candidates = [b for b in range(len(free)) if free[b] >= sizes[i]]
        if candidates:
            b = min(candidates, key=lambda b: free[b])
        else:
            free.append(40)
            b = len(free) - 1
        ref_bin[i] = b
        free[b] -= sizes[i]
    assert n_bins == len(free)
    fill = np.zeros(n_bins, dtype=np.int64)
    np.add.at(fill, bin_of, sizes)
    assert sorted(fill.tolist()) == sorted(40 - f for f in free)
    assert (offset + sizes <= 40).all()


def test_pad_or_truncate(docs):
    rows, truncated = pad_or_truncate(docs, 40, pad_id=2)
    assert rows.input_ids.shape == (len(docs), 40)
    kept = np.minimum(docs.lengths, 40)
    assert truncated == int((docs.lengths - kept).sum()) > 0
    np.testing.assert_array_equal(rows.attention_mask.sum(1), kept)
    for i in (0, 5):
        np.testing.assert_array_equal(
            rows.input_ids[i, : kept[i]], docs.tokens[docs.offsets[i] : docs.offsets[i] + kept[i]]
        )


def test_chat_loss_mask_covers_exactly_the_answer(tokenizer):
    problems = arithmetic_problems(12, seed=3)
    questions, answers = [p["question"] for p in problems], [p["answer"] for p in problems]
    docs = tokenize_chats(tokenizer, questions, answers, system_prompt="Be brief.")
    for i, answer in enumerate(answers):
        ids = docs.tokens[docs.offsets[i] : docs.offsets[i + 1]]
        mask = docs.loss_mask[docs.offsets[i] : docs.offsets[i + 1]]
        first = int(np.argmax(mask))
        assert mask[first:].all() and not mask[:first].any()  # one contiguous suffix
        assert tokenizer.decode(ids[mask == 1]) == answer + "<|im_end|>\n"
        prompt = tokenizer.decode(ids[mask == 0])
        assert questions[i] in prompt and "Be brief." in prompt and answer not in prompt
    # The mask travels with its tokens through packing.
    for rows in (pack_best_fit(docs, SEQ_LEN, 2)[0], pack_wrapped(docs, SEQ_LEN, 2)):
        assert not (rows.loss_mask.astype(bool) & ~rows.attention_mask.astype(bool)).any()
        assert sorted(rows.input_ids[rows.loss_mask == 1].tolist()) == sorted(docs.tokens[docs.loss_mask == 1].tolist())
    all_tokens = tokenize_chats(tokenizer, questions, answers, None, take_loss_over_all_tokens=True)
    assert all_tokens.loss_mask.all()


@pytest.mark.parametrize("mode", ["wrapped", "best_fit"])
def test_two_workers_equal_one_worker(tokenizer, corpus, mode):
    table = pa.table({"text": corpus, "other": list(range(len(corpus)))})
    eos, pad = special_token_ids(tokenizer)
    cfg = PackConfig(seq_len=SEQ_LEN, mode=mode, batch_size=37, eos_id=eos, pad_id=pad)
    one = Rows.concat([r for r, _ in iter_packed_rows(table, tokenizer, cfg, num_proc=1, progress=False)])
    two = Rows.concat([r for r, _ in iter_packed_rows(table, tokenizer, cfg, num_proc=2, progress=False)])
    np.testing.assert_array_equal(one.input_ids, two.input_ids)
    np.testing.assert_array_equal(one.attention_mask, two.attention_mask)
    if mode == "wrapped":
        np.testing.assert_array_equal(one.real_tokens(), tokenize_texts(tokenizer, corpus, eos).tokens)


def test_tokenizer_without_eos_is_an_error(tmp_path, tokenizer_dir, raw_text_dir):
    from transformers import AutoTokenizer

    from retrofit.data.preprocess import process_data

    no_eos = AutoTokenizer.from_pretrained(tokenizer_dir)
    no_eos.eos_token = None
    no_eos.save_pretrained(tmp_path / "no_eos")
    with pytest.raises(DataError, match=r"tokenizer '.*no_eos' has no eos_token; documents must end with EOS"):
        process_data(tokenizer_name=str(tmp_path / "no_eos"), dataset_location=str(raw_text_dir), save_path=str(tmp_path))


def test_bad_config_errors(tokenizer):
    table = pa.table({"text": ["a b", "c"]})
    with pytest.raises(DataError, match="max_length=1 is too small"):
        list(iter_packed_rows(table, tokenizer, PackConfig(seq_len=2), progress=False))
    with pytest.raises(DataError, match=r"no column 'content' \(columns: text\)"):
        list(iter_packed_rows(table, tokenizer, PackConfig(seq_len=9, q_col="content"), progress=False))
    with pytest.raises(DataError, match="the dataset has no rows"):
        list(iter_packed_rows(table.slice(0, 0), tokenizer, PackConfig(seq_len=9), progress=False))
    with pytest.raises(DataError, match="row 1 of column 'text' is null"):
        list(iter_packed_rows(pa.table({"text": ["a", None]}), tokenizer, PackConfig(seq_len=9), progress=False))


# ---------------------------------------------------------------------------------------------
# The CLI, end to end
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def raw_text_dir(tmp_path_factory, corpus):
    import datasets

    out = tmp_path_factory.mktemp("raw") / "arith"
    datasets.Dataset.from_dict({"text": corpus, "id": list(range(len(corpus)))}).save_to_disk(str(out))
    return out


def test_cli_best_fit_and_chat(tmp_path, tokenizer_dir, tokenizer):
    import datasets

    from retrofit.data.preprocess import process_data

    problems = arithmetic_problems(40, seed=5)
    qa_dir = tmp_path / "qa"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"question": [p["question"] for p in problems], "answer": [p["answer"] for p in problems]}
            )
        }
    ).save_to_disk(str(qa_dir))
    out = process_data(
        tokenizer_name=str(tokenizer_dir),
        dataset_location=str(qa_dir),
        q_col="question",
        a_col="answer",
        max_length=320,
        pack=True,
        wrapped_packing=False,
        num_proc=1,
        save_path=str(tmp_path / "out"),
        progress=False,
    )
    assert out == tmp_path / "out" / "llama_huginn_preprocessed_data_packed" / tokenizer_dir.name / "qa" / "dataset"
    packed = datasets.load_from_disk(str(out))
    assert packed.column_names == ["input_ids", "attention_mask", "loss_mask"]
    rows = Rows.from_arrow(packed.data.table)
    assert rows.input_ids.shape[1] == 321
    answer_text = tokenizer.decode(rows.input_ids[rows.loss_mask == 1])
    assert all(p["answer"] in answer_text for p in problems)
    assert not (tmp_path / "out" / "posttrain_huginn").exists()  # cache cleaned up
    # train.py's reader of save_to_disk data trains on the answer tokens only.
    from retrofit.data.stream import PackedDatasetStream

    batch = PackedDatasetStream(packed, micro_batch_size=4, shuffle=False).next_batch()
    _, _, labels = inputs_and_labels(**batch)
    assert int((labels != -100).sum()) == int(batch["loss_mask"][:, 1:].sum()) > 0


def run_cli(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path, tokenizer_dir, raw_text_dir, capsys):
    script = ROOT / "preprocess_data_packing.py"
    common = [f"--tokenizer_name={tokenizer_dir}", f"--save_path={tmp_path}", "--num_proc=1", "--progress=false"]
    missing = run_cli(script, *common, f"--dataset_location={raw_text_dir}", "--q_col=body")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == "error: the dataset has no column 'body' (columns: text, id)"

    from preprocess_data_packing import main

    assert main([*common, f"--dataset_location={raw_text_dir}", "--max_length=32", "--max_samples=50"]) == 0
    assert main([*common, f"--dataset_location={raw_text_dir}", "--max_length=32"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: output folder") and last.endswith(
        "already exists (pass --overwrite=true to replace it)"
    )
    assert main([*common, f"--dataset_location={raw_text_dir}", "--max_length=32", "--overwrite=true"]) == 0  # replaced


def test_process_data_input_errors(tmp_path, tokenizer_dir, raw_text_dir):
    from retrofit.data.preprocess import process_data

    kw = dict(tokenizer_name=str(tokenizer_dir), save_path=str(tmp_path), num_proc=1, progress=False)
    with pytest.raises(DataError, match="max_length=1 is too small"):
        process_data(dataset_location=str(raw_text_dir), max_length=1, **kw)
    with pytest.raises(DataError, match="wrapped_packing=true needs pack=true"):
        process_data(dataset_location=str(raw_text_dir), pack=False, **kw)
    with pytest.raises(DataError, match="has no rows"):
        process_data(dataset_location=str(raw_text_dir), max_samples=0, **kw)
    with pytest.raises(DataError, match="does not exist"):
        process_data(dataset_location=str(tmp_path / "nope"), **kw)
