"""Hugging Face checkpoints: open and validate a folder, or fetch one through huggingface_hub.

Only safetensors are read. Pickle weights (*.bin, *.pt, *.pth, *.ckpt) are refused, and so is
any checkpoint that asks for remote code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from ..arch import Arch, arch_for_config
from ..errors import SourceError
from ..process import sha256_file
from .safetensors import Reader, TensorInfo, read_header
from ..schemas import ModelConfig

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_PATTERNS = ["*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                "special_tokens_map.json", "added_tokens.json"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig   # config.json, parsed once: every stage reads this, never the file
    arch: Arch
    tensors: dict[str, TensorInfo]
    files: list[Path] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def tied(self) -> bool:
        return self.config.tie_word_embeddings

    def reader(self) -> Reader:
        return Reader(self.tensors)

    def file_hashes(self) -> dict[str, str]:
        """sha256 of every file that went into the build (the manifest's record of a local source)."""
        from ..progress import bar
        names = [p for p in self.files] + [self.path / n for n in ("config.json",) + TOKENIZER_FILES]
        names = [p for p in names if p.exists()]
        with bar("hash source", sum(p.stat().st_size for p in names)) as upd:
            return {p.name: sha256_file(p, upd) for p in names}


def copy_tokenizer(src: Path, out_dir: Path, also: tuple[str, ...] = ()) -> None:
    """The tokenizer, its chat template and generation defaults, beside a build's weights (genai and mlx-lm
    read them from the build folder)."""
    import shutil

    from ..errors import BuildError
    if not (src / "tokenizer.json").exists():
        raise BuildError(f"{src}: no tokenizer.json; a build needs the tokenizer")
    for name in (*TOKENIZER_FILES, "chat_template.jinja", "generation_config.json", *also):
        if (src / name).exists():
            shutil.copyfile(src / name, out_dir / name)


def _load_json(path: Path, what: str) -> dict:
    from ..schemas import read_json
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise SourceError(f"{path}: {what} must be a JSON object, not {type(data).__name__}")
    return data


def open_checkpoint(path: Path) -> Checkpoint:
    """Validate a Hugging Face folder: config is a known arch, weights are complete safetensors."""
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"{path}: no such checkpoint folder")
    if not (path / "config.json").exists():
        raise SourceError(f"{path}: no config.json; is this a Hugging Face checkpoint folder?")
    config = _load_json(path / "config.json", "config.json")
    arch = arch_for_config(config)
    if arch is None:
        names = config.get("architectures")
        names = ", ".join(map(str, names)) if isinstance(names, list) and names else "?"
        raise SourceError(f"{path}: config is model_type={config.get('model_type')!r} ({names}), not qwen2")
    if config.get("auto_map"):
        raise SourceError(f"{path}: config asks for remote code (auto_map); edgeqwen never runs remote code")
    missing = [k for k in arch.required_config if k not in config]
    if missing:
        raise SourceError(f"{path}: config.json lacks {', '.join(missing)}")
    from ..schemas import WeightIndex, check_source
    cfg = check_source(ModelConfig, config, path / "config.json", "config.json")

    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = check_source(WeightIndex, _load_json(index, "the weight index"), index, "the index").weight_map
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise SourceError(f"{path}: only pickle weights ({', '.join(pickles[:3])}); edgeqwen never loads "
                              "pickle. Convert them to safetensors first")
        raise SourceError(f"{path}: no *.safetensors weights")
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        if not f.exists():
            raise SourceError(f"{path}: the index names {f.name}, which is missing")
        tensors.update(read_header(f))
    _check_tokenizer_files(path)
    ckpt = Checkpoint(path=path, config=cfg, arch=arch, tensors=tensors, files=files)
    check_tensors(ckpt)
    return ckpt


def _check_tokenizer_files(path: Path) -> None:
    """The tokenizer files a build reads, checked here, before any work (a build without one fails later)."""
    from ..schemas import TokenizerConfig, TokenizerFile, check_source, read_json
    for name, model in (("tokenizer.json", TokenizerFile), ("tokenizer_config.json", TokenizerConfig)):
        if (path / name).exists():
            check_source(model, read_json(path / name, name), path / name, name)


def expected_tensors(config: ModelConfig, arch: Arch) -> dict[str, tuple[int, ...]]:
    """Every tensor a complete checkpoint of this config has, with its Hugging Face shape."""
    h, ff = config.hidden_size, config.intermediate_size
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    hd = config.head_size
    v = config.vocab_size
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (nh * hd, h), p + "self_attn.k_proj.weight": (nkv * hd, h),
            p + "self_attn.v_proj.weight": (nkv * hd, h), p + "self_attn.o_proj.weight": (h, nh * hd),
            p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h),
            p + "mlp.down_proj.weight": (h, ff),
        })
        if arch.attention_bias:
            out.update({p + "self_attn.q_proj.bias": (nh * hd,), p + "self_attn.k_proj.bias": (nkv * hd,),
                        p + "self_attn.v_proj.bias": (nkv * hd,)})
    return out


def check_tensors(ckpt: Checkpoint) -> None:
    want = expected_tensors(ckpt.config, ckpt.arch)
    missing = [n for n in want if n not in ckpt.tensors]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise SourceError(f"{ckpt.path}: checkpoint is incomplete: {missing[0]}{more} missing")
    for n, shape in want.items():
        if ckpt.tensors[n].shape != shape:
            raise SourceError(f"{ckpt.path}: {n} has shape {ckpt.tensors[n].shape}, config says {shape}")
    name_map = gguf.get_tensor_name_map(ckpt.arch.gguf_arch, ckpt.n_layers)
    for n in ckpt.tensors:
        if n not in want and n != "lm_head.weight" and name_map.get_name(n, try_suffixes=(".weight", ".bias")) is None:
            raise SourceError(f"{ckpt.path}: unexpected tensor {n} for {ckpt.arch.name}")


# --- the hub -----------------------------------------------------------------------------------

def fetch_from_hub(repo_id: str, revision: str, patterns: list[str] | None = None) -> tuple[Path, str]:
    """Download (or find in the huggingface_hub cache) the files a build needs; returns (folder, commit).

    Goes through huggingface_hub, so its cache, resume, progress bars and HF_HUB_OFFLINE apply.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    try:
        folder = snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=patterns or HUB_PATTERNS)
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise SourceError(f"{repo_id}@{revision} is not in the Hugging Face cache and {why}; download it "
                          "elsewhere and pass --source /path/to/checkpoint") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise SourceError(f"{repo_id}@{revision}: {type(e).__name__}; check the recipe's hub_repo/revision") from None
    except (HfHubHTTPError, OSError) as e:
        raise SourceError(f"{repo_id}@{revision}: download failed: {str(e).splitlines()[0]}") from None
    folder = Path(folder)
    return folder, folder.name  # snapshot folders are named by commit sha


def find_tokenizer(repo_id: str, revision: str = "main") -> Path | None:
    """The real tokenizer of a hub repo, from the cache or a small download; None if unavailable."""
    try:
        folder, _ = fetch_from_hub(repo_id, revision, patterns=list(TOKENIZER_FILES))
    except SourceError:
        return None
    return folder if (folder / "tokenizer.json").exists() else None
