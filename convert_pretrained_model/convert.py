"""Convert a HF decoder LM into a depth-recurrent model; the family comes from its config.json.

    python convert_pretrained_model/convert.py --model_name models/Qwen2.5-0.5B --save_name models/Recurrent-Qwen2.5-0.5B \
        --preset qwen2.5-0.5b-4-8-4

Supported model_types: llama (TinyLlama, Llama-3.2, SmolLM, SmolLM2), mistral (no sliding window),
qwen2 (Qwen2, Qwen2.5), qwen3 (dense Qwen3), olmo2. Anything else (sliding window in use,
mixture-of-experts, Gemma's norm offset, ...) is refused with one line naming what is missing.
Choose layers with --preset or --prelude_idx/--core_idx/--coda_idx (choose_split.py prints them).
After saving, the converter reloads the model and prints a per-layer table of max |diff| against
the base with only the chosen layers kept; it exits non-zero when a difference exceeds
1e-4 * max(1, max |reference|).
"""

import sys

from retrofit.model.conversion import main

if __name__ == "__main__":
    sys.exit(main(None))
