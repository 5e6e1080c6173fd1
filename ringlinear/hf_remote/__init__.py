"""Remote code that lets transformers load the checkpoints ringlinear saves (`trust_remote_code=True`): two files
written beside config.json and the `auto_map` that names them. The files import only torch and transformers and
are never imported by ringlinear; a checkpoint that brings its own `auto_map` keeps it and its files."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ringlinear.config import RingLinearConfig

FILES = ("configuration_bailing_moe_linear.py", "modeling_bailing_moe_linear.py")
AUTO_MAP = {
    "AutoConfig": "configuration_bailing_moe_linear.BailingMoeLinearV2Config",
    "AutoModel": "modeling_bailing_moe_linear.BailingMoeLinearV2Model",
    "AutoModelForCausalLM": "modeling_bailing_moe_linear.BailingMoeLinearV2ForCausalLM",
}


def _module_files(auto_map: dict) -> list[str]:
    """The local .py files an auto_map points to ("module.Class"; lists for tokenizers; "repo--module.Class" lives
    in another repository and needs no local file)."""
    refs = []
    for value in auto_map.values():
        refs.extend(value if isinstance(value, (list, tuple)) else [value])
    return sorted({ref.rsplit(".", 1)[0].replace(".", "/") + ".py" for ref in refs
                   if isinstance(ref, str) and "--" not in ref and "." in ref})


def remote_code_files(config: RingLinearConfig,
                      *search_dirs: str | os.PathLike | None) -> tuple[RingLinearConfig, dict[str, bytes]]:
    """(config to write, {file name: bytes} to write beside it). Without an `auto_map`, or with ours: our two files
    and our `auto_map`. With another `auto_map` (e.g. the official release's): the config unchanged and the .py
    files of the first of `search_dirs` (the checkpoint being replaced, the one the model was loaded from) that holds
    every file it names; a warning if none does."""
    auto_map = config.extra.get("auto_map")
    if auto_map is None or auto_map == AUTO_MAP:
        here = Path(__file__).parent
        files = {name: (here / name).read_bytes() for name in FILES}
        return config.replace(extra={**config.extra, "auto_map": dict(AUTO_MAP)}), files
    needed = _module_files(auto_map)
    dirs = [Path(d) for d in search_dirs if d is not None]
    for d in dirs:
        if needed and all((d / name).is_file() for name in needed):
            return config, {p.name: p.read_bytes() for p in sorted(d.glob("*.py"))}
    if needed:
        warnings.warn(f"config.json keeps its auto_map, whose files {needed} are in none of {[str(d) for d in dirs]}: "
                      "copy them into the saved checkpoint to load it with transformers' trust_remote_code",
                      stacklevel=3)
    return config, {}
