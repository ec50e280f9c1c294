#!/usr/bin/env bash
# The data pipeline behind the training runs, as CPU jobs: download the raw data sets, tokenize
# and pack each one into rows of 1025 tokens with a model's tokenizer, then write parquet shards
# where shells/{tinyllama,llama,olmo}.sh look for them:
#
#   bash shells/preprocess/data.sh download
#   bash shells/preprocess/data.sh tokenize-llama-math     # after download finished
#   bash shells/preprocess/data.sh parquet-llama-math      # after tokenize-llama-math finished
#
# Paths come from the machine config: DATASETS_DIR (raw), TOKENIZED_DATA_PATH, CACHE_DIR,
# PROCESSED_DATA_PATH (parquet). mix-tinyllama makes figure 8's FineWeb-Edu + Nemotron SFT mix.
set -euo pipefail
# shellcheck source=shells/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../_common.sh"

JOB_PREFIX=data
EXPERIMENT_INTRO="Download, tokenize and parquet jobs (CPU) for the paper's data sets."

download() {
    require_config DATASETS_DIR
    # Writes $DATASETS_DIR/datasets/{fineweb_edu-350b, Nemotron-CC-Math-v1-4plus, Nemotron-Pretraining-SFT-v1-*}.
    JOB_CMD=(python utils/download_ds.py --dataset_path="$DATASETS_DIR")
}
experiment download 1 0 "FineWeb-Edu 350BT sample, Nemotron-CC-Math 4+, Nemotron SFT general/code/math" download

# tokenize TOKENIZER OUT_NAME RAW_NAME: preprocess_data_packing.py writes (wrapped packing, the default)
# $TOKENIZED_DATA_PATH/llama_huginn_preprocessed_data_packed_wrapped/TOKENIZER/OUT_NAME/dataset.
tokenize() {
    require_config DATASETS_DIR TOKENIZED_DATA_PATH
    JOB_CMD=(python preprocess_data_packing.py --tokenizer_name="$1" --out_path="$2"
        --dataset_location="$DATASETS_DIR/datasets/$3" --save_path="$TOKENIZED_DATA_PATH")
    if [[ -n "${CACHE_DIR:-}" ]]; then JOB_CMD+=(--cache_path="$CACHE_DIR"); fi
}
packed() {  # TOKENIZER OUT_NAME -> where tokenize wrote that data set
    echo "$TOKENIZED_DATA_PATH/llama_huginn_preprocessed_data_packed_wrapped/$1/$2/dataset"
}
# parquet TOKENIZER OUT_NAME: shards in $PROCESSED_DATA_PATH/TOKENIZER/OUT_NAME/dataset.
parquet() {
    require_config TOKENIZED_DATA_PATH PROCESSED_DATA_PATH
    JOB_CMD=(python utils/to_parquet.py --dataset_path="$(packed "$1" "$2")"
        --dataset_save_dir="$PROCESSED_DATA_PATH/$1/$2/dataset")
}

# One tokenize and one parquet job per data set: NAME TOKENIZER OUT_NAME RAW_NAME.
data_set() {
    experiment "tokenize-$1" 1 0 "tokenize $4 with $2" tokenize "$2" "$3" "$4"
    experiment "parquet-$1" 1 0 "parquet shards of $3" parquet "$2" "$3"
}
TINYLLAMA=smcleish/Recurrent-TinyLlama-3T-untrained
LLAMA=smcleish/Recurrent-Llama-3.2-2-4-2-untrained
OLMO=smcleish/Recurrent-OLMo-2-0425-untrained
data_set tinyllama-fineweb "$TINYLLAMA" tinyllama_1_1b_packed_350b_sample_wrapped_packing fineweb_edu-350b
data_set tinyllama-math "$TINYLLAMA" tinyllama_1_1b_packed_nemotron_cc_math_v1_4plus_wrapped_packing Nemotron-CC-Math-v1-4plus
data_set tinyllama-sft-general "$TINYLLAMA" tinyllama_1_1b_packed_nemotron_sft_v1_general_wrapped_packing Nemotron-Pretraining-SFT-v1-General
data_set tinyllama-sft-math "$TINYLLAMA" tinyllama_1_1b_packed_nemotron_sft_v1_math_wrapped_packing Nemotron-Pretraining-SFT-v1-Math
data_set llama-fineweb "$LLAMA" llama_1b_packed_350b_sample_wrapped_packing fineweb_edu-350b
data_set llama-math "$LLAMA" llama_1b_packed_nemotron_cc_math_v1_4plus_wrapped_packing Nemotron-CC-Math-v1-4plus
data_set olmo-math "$OLMO" olmo_2_0425_1b_packed_nemotron_cc_math_v1_4plus_wrapped_packing_10_splits Nemotron-CC-Math-v1-4plus

# Figure 8's mix: about 12.8M rows (13B tokens) each of FineWeb-Edu, Nemotron SFT general and
# Nemotron SFT math, shuffled together (seed 42), for TinyLlama's mix-* runs.
mix_tinyllama() {
    require_config TOKENIZED_DATA_PATH PROCESSED_DATA_PATH
    JOB_CMD=(python mix_datasets.py
        --out_dir="$PROCESSED_DATA_PATH/$TINYLLAMA/fineweb_nemotron_sft_general_math_even_mix/dataset"
        --sources "$(packed "$TINYLLAMA" tinyllama_1_1b_packed_350b_sample_wrapped_packing):12800000"
        "$(packed "$TINYLLAMA" tinyllama_1_1b_packed_nemotron_sft_v1_general_wrapped_packing):12800000"
        "$(packed "$TINYLLAMA" tinyllama_1_1b_packed_nemotron_sft_v1_math_wrapped_packing):12800000")
}
experiment mix-tinyllama 1 0 "Fig. 8 mix of tinyllama-fineweb, -sft-general, -sft-math (after tokenizing them)" mix_tinyllama

experiments_main "$@"
