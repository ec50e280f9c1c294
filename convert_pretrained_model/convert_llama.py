"""Convert a HF Llama checkpoint into a depth-recurrent model, with built-in verification.

    python convert_pretrained_model/convert_llama.py --model_name models/BASE --save_name models/Recurrent-BASE \
        --preset tinyllama-4-8-4

or choose layers explicitly with --prelude_idx 0-3 --core_idx 10-17 --coda_idx 18-21. After saving, the
converter reloads the model and prints a per-layer table of max |diff| against the base model with
only the chosen layers kept; it exits non-zero when a difference exceeds 1e-4 * max(1, max |reference|).
"""

import sys


from retrofit.model.conversion import main

if __name__ == "__main__":
    sys.exit(main("llama"))
