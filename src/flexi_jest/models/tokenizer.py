"""The model's tokenizer, as open_clip.get_tokenizer(name) builds it from the model's text_cfg: its HFTokenizer
where text_cfg names a Hugging Face tokenizer (hf_tokenizer_name, e.g. ViT-B-16-SigLIP's `timm/ViT-B-16-SigLIP`),
open_clip's BPE SimpleTokenizer otherwise (and for the project's configs), with text_cfg's tokenizer_kwargs, at
cfg.context_length. (open_clip's guess from the name alone, a SigLIP sentencepiece tokenizer for a name with
"siglip" and no hf_tokenizer_name, is not followed: no open_clip config relies on it, and it downloads.)

A Hugging Face tokenizer is read from local files only, never downloaded: from the Hugging Face cache
(HF_HUB_CACHE / HF_HOME; HF_HUB_OFFLINE=1 where there is no network) or from a local directory named as the
config's hf_tokenizer_name (one that tokenizer.save_pretrained wrote). When it is missing, Tokenizer(cfg) fails
at once with TokenizerUnavailable, which says how to make it available.
"""

import tempfile
from pathlib import Path

from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from torch import Tensor

from flexi_jest.config import ModelConfig
from flexi_jest.errors import BadInput
from flexi_jest.models.configs import open_clip_config


class TokenizerUnavailable(RuntimeError, BadInput):
    """The model's Hugging Face tokenizer is neither in the local cache nor a local directory."""


class Tokenizer:
    """list of B strings -> LongTensor [B, cfg.context_length]: the tokens open_clip's tokenizer for cfg gives."""

    def __init__(self, cfg: ModelConfig):
        text = open_clip_config(cfg).get("text_cfg", {})
        kwargs, hf_name = text.get("tokenizer_kwargs", {}), text.get("hf_tokenizer_name")
        if not hf_name:
            self._tokenizer = SimpleTokenizer(context_length=cfg.context_length, **kwargs)
            return
        try:  # local_files_only: transformers reads the cache or the directory and never calls the hub
            self._tokenizer = HFTokenizer(hf_name, context_length=cfg.context_length,
                                          tokenizer_mode=text.get("tokenizer_mode"), local_files_only=True, **kwargs)
        except Exception as exc:  # transformers raises OSError when absent, others for unreadable files
            reason = "" if isinstance(exc, OSError) else f" (loading it failed: {type(exc).__name__}: " \
                                                          f"{str(exc).splitlines()[0] if str(exc) else ''})"
            raise TokenizerUnavailable(
                f"model {cfg.name} tokenizes with the Hugging Face tokenizer {hf_name!r}, which is not available "
                f"offline{reason}: flexi-jest downloads nothing, so it must be in the local Hugging Face cache "
                f"(HF_HUB_OFFLINE=1; HF_HUB_CACHE or HF_HOME say where the cache is) or be a local directory "
                f"named as text_cfg.hf_tokenizer_name of your own open_clip model config. On a machine with "
                f"network run `hf download {hf_name}` (huggingface_hub's CLI; older: `huggingface-cli download "
                f"{hf_name}`), then copy its cache (~/.cache/huggingface/hub) to this machine") from None

    def __call__(self, texts: list[str]) -> Tensor:
        """list of B strings -> LongTensor [B, context_length] (truncated; padded as open_clip pads)."""
        return self._tokenizer(texts)

    def hugging_face_files(self) -> dict[str, bytes]:
        """{file name: bytes} of a Hugging Face tokenizer as save_pretrained writes it ({} for open_clip's BPE
        tokenizer, which ships with open_clip): an open_clip `local-dir:` folder holds them beside its config."""
        if not isinstance(self._tokenizer, HFTokenizer):
            return {}
        with tempfile.TemporaryDirectory() as tmp:
            self._tokenizer.save_pretrained(tmp)
            return {path.name: path.read_bytes() for path in sorted(Path(tmp).iterdir()) if path.is_file()}
